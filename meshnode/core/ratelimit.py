"""Token buckets: a global one and one per key (a peer id), checked in that order of
cheapness by callers that must drop work *before* paying for it.

Sans-io: time is a parameter (any monotonic clock); nothing here reads a clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass
class TokenBucket:
    """``burst`` tokens at most, refilled at ``rate`` per second."""

    rate: float
    burst: float
    tokens: float
    updated_at: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        if rate < 0 or burst < 1:
            raise ValueError(f"need rate >= 0 and burst >= 1, got {rate}, {burst}")
        return cls(rate=rate, burst=burst, tokens=burst, updated_at=now)

    def refill(self, now: float) -> None:
        # max(): a clock stepping backwards must not mint or burn tokens.
        elapsed = max(0.0, now - self.updated_at)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated_at = max(self.updated_at, now)

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class RateLimiter:
    """Admits an event if both its key's bucket and the global bucket have a token.

    The key's bucket is charged first, so one noisy key cannot spend more than its own
    rate of the global budget. At most ``max_keys`` per-key buckets are kept (least
    recently used dropped first): a stream of fresh keys costs bounded memory, and a
    dropped key only gets a full bucket back, never more than ``key_burst``.
    """

    def __init__(
        self,
        *,
        key_rate: float,
        key_burst: float,
        global_rate: float,
        global_burst: float,
        max_keys: int,
        now: float,
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.key_rate = key_rate
        self.key_burst = key_burst
        self.max_keys = max_keys
        self.global_bucket = TokenBucket.full(global_rate, global_burst, now)
        TokenBucket.full(key_rate, key_burst, now)  # validates the per-key parameters
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self.admitted = 0
        self.dropped = 0

    def admit(self, key: Hashable, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket.full(self.key_rate, self.key_burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if not bucket.take(now):
            self.dropped += 1
            return False
        if not self.global_bucket.take(now):
            bucket.tokens += 1.0  # not this key's fault: give its token back
            self.dropped += 1
            return False
        self.admitted += 1
        return True
