"""Token buckets for work that must be dropped before it is paid for."""

from __future__ import annotations

from meshnode.core.ratelimit import RateLimiter, TokenBucket


def _limiter(max_keys: int = 8) -> RateLimiter:
    return RateLimiter(key_rate=1.0, key_burst=3, global_rate=10.0, global_burst=5,
                       max_keys=max_keys, now=0.0)


def test_a_bucket_admits_its_burst_then_its_rate() -> None:
    b = TokenBucket.full(rate=2.0, burst=4, now=0.0)
    assert [b.take(0.0) for _ in range(5)] == [True] * 4 + [False]
    assert b.take(0.5) and not b.take(0.5)


def test_a_clock_stepping_back_mints_nothing() -> None:
    b = TokenBucket.full(rate=1.0, burst=1, now=100.0)
    assert b.take(100.0)
    assert not b.take(50.0) and not b.take(100.5)
    assert b.take(101.0)


def test_one_noisy_key_spends_only_its_own_burst_of_the_global_budget() -> None:
    lim = _limiter()
    assert sum(lim.admit("noisy", 0.0) for _ in range(100)) == 3
    assert sum(lim.admit(f"k{i}", 0.0) for i in range(2)) == 2  # global burst 5 - 3
    assert not lim.admit("k9", 0.0)  # the global bucket is empty now
    assert lim.dropped == 98


def test_fresh_keys_are_bounded_by_the_global_bucket_and_memory_by_max_keys() -> None:
    lim = _limiter(max_keys=4)
    admitted = sum(lim.admit(f"fresh-{i}", t / 100) for i, t in enumerate(range(1000)))
    # 10 s of virtual time: the global burst plus its rate, however many keys.
    assert admitted <= 5 + 10.0 * 10
    assert len(lim._buckets) == 4
