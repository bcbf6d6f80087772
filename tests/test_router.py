"""Router: filtering, the score, each strategy, failure penalties, persisted stats."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter

import pytest
from nacl.signing import SigningKey

from meshnode.core.advert import Advert, Capacity, Load, ModelOffer, encode_signed
from meshnode.core.directory import Directory
from meshnode.core.peerid import peer_id_from_ed25519
from meshnode.core.router import (
    DEFAULT_RTT_S,
    FAILURE_PENALTY_S,
    MAX_PENALTY_S,
    P2C_SCORE_CUTOFF,
    PENALTY_HALF_LIFE_S,
    Candidate,
    CandidateTable,
    JobEstimate,
    Router,
    StatsFormatError,
    Strategy,
)

NOW = 1_000.0
MODEL = hashlib.sha256(b"model").hexdigest()
JOB = JobEstimate(model_id=MODEL, prompt_tokens=100, completion_tokens=200)


def cand(name: str, **kw: object) -> Candidate:
    base = Candidate(
        peer_id=name,
        model_id=MODEL,
        price_prompt_per_1k=1000,
        price_completion_per_1k=1000,
        slots=1,
        busy_slots=0,
        queue_len=0,
        tokens_per_s=50.0,
        verified=True,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def firsts(router: Router, pool: list[Candidate], n: int) -> Counter[str]:
    return Counter(router.choose(pool, JOB, NOW)[0].peer_id for _ in range(n))


# ---------------------------------------------------------------------------- filtering


def test_only_candidates_for_the_jobs_model_are_eligible() -> None:
    pool = [cand("a"), cand("b", model_id=hashlib.sha256(b"other").hexdigest())]
    assert [c.peer_id for c in Router().choose(pool, JOB, NOW)] == ["a"]


def test_candidates_above_the_price_cap_are_dropped() -> None:
    pool = [cand("a", price_completion_per_1k=5000), cand("b", price_prompt_per_1k=5000)]
    job = dataclasses.replace(JOB, max_price_prompt_per_1k=2000, max_price_completion_per_1k=2000)
    assert Router().choose(pool, job, NOW) == []
    capped_prompt_only = dataclasses.replace(JOB, max_price_prompt_per_1k=2000)
    assert [c.peer_id for c in Router().choose(pool, capped_prompt_only, NOW)] == ["a"]


def test_unverified_candidates_need_the_insecure_flag() -> None:
    pool = [cand("a", verified=False)]
    assert Router().choose(pool, JOB, NOW) == []
    assert [c.peer_id for c in Router(allow_unverified=True).choose(pool, JOB, NOW)] == ["a"]


def test_duplicate_candidates_appear_once() -> None:
    pool = [cand("a"), cand("a"), cand("b")]
    assert sorted(c.peer_id for c in Router().choose(pool, JOB, NOW)) == ["a", "b"]


@pytest.mark.parametrize("strategy", list(Strategy))
def test_every_strategy_returns_each_candidate_once_as_choice_or_fallback(
    strategy: Strategy,
) -> None:
    pool = [cand(n, tokens_per_s=10.0 * (i + 1)) for i, n in enumerate("abcde")]
    ordered = Router(strategy, seed=1).choose(pool, JOB, NOW)
    assert sorted(c.peer_id for c in ordered) == list("abcde")


def test_candidates_from_the_directory_carry_offer_load_and_verification() -> None:
    key = SigningKey(b"\x03" * 32)
    pubkey = bytes(key.verify_key)
    advert = Advert(
        peer_id=peer_id_from_ed25519(pubkey),
        peer_pubkey=pubkey,
        addrs=(),
        models=(ModelOffer(MODEL, "m", "Q8_0", 2048, 7, 9),),
        capacity=Capacity(slots=4, tokens_per_s=33.0),
        load=Load(busy_slots=2, queue_len=1),
        job_pubkey=b"\x00" * 32,
        seq=1,
        issued_at=NOW,
        expires_at=NOW + 60,
    )
    directory = Directory()
    directory.insert(encode_signed(advert, b"\x03" * 32), NOW)
    directory.set_verification(advert.peer_id, True, "ok")
    (c,) = [Candidate.from_provider(p) for p in directory.providers_for(MODEL, NOW)]
    assert c == Candidate(advert.peer_id, MODEL, 7, 9, 4, 2, 1, 33.0, True)


# -------------------------------------------------------------------------------- score


def test_score_of_an_idle_unknown_provider_is_rtt_plus_generation() -> None:
    c = cand("a", tokens_per_s=50.0)
    expected = DEFAULT_RTT_S + 200 / 50.0 + 100 / (50.0 * 10)
    assert Router(price_weight_s_per_nanoton=0.0).score(c, JOB, NOW) == pytest.approx(expected)


def test_queue_ahead_adds_mean_job_time_per_slot() -> None:
    router = Router(price_weight_s_per_nanoton=0.0)
    idle = router.score(cand("a", slots=2), JOB, NOW)
    queued = router.score(cand("a", slots=2, busy_slots=2, queue_len=3), JOB, NOW)
    generation = 200 / 50.0 + 100 / 500.0
    assert queued - idle == pytest.approx(4 * generation / 2)


def test_measured_rtt_replaces_the_default() -> None:
    router = Router(strategy=Strategy.FASTEST)
    router.record_rtt("a", 2.0, NOW)
    router.record_rtt("b", 0.01, NOW)
    assert [c.peer_id for c in router.choose([cand("a"), cand("b")], JOB, NOW)] == ["b", "a"]


def test_rtt_is_smoothed_not_replaced_by_one_sample() -> None:
    router = Router()
    router.record_rtt("a", 0.1, NOW)
    router.record_rtt("a", 1.1, NOW)
    rtt = router.stats("a").rtt_s
    assert rtt is not None and 0.1 < rtt < 1.1


def test_measured_speed_replaces_the_advertised_one() -> None:
    router = Router(strategy=Strategy.FASTEST)
    # "a" advertises 100 tok/s but delivered 199 tokens in 19.9 s after the first token
    router.record_success("a", NOW, duration_s=20.0, completion_tokens=200, first_token_s=0.1)
    assert router.stats("a").tokens_per_s == pytest.approx(10.0)
    assert router.speed(cand("a", tokens_per_s=100.0)) == pytest.approx(10.0)
    router.record_success("b", NOW, duration_s=4.1, completion_tokens=200, first_token_s=0.1)
    ranked = router.choose([cand("a", tokens_per_s=100.0), cand("b", tokens_per_s=5.0)], JOB, NOW)
    assert ranked[0].peer_id == "b"


def test_price_breaks_a_tie_between_equally_fast_providers() -> None:
    pool = [cand("a", price_completion_per_1k=9_000_000), cand("b")]
    assert Router(Strategy.FASTEST).choose(pool, JOB, NOW)[0].peer_id == "b"


# --------------------------------------------------------------------------- strategies


def test_random_is_reproducible_from_the_seed_and_spreads() -> None:
    pool = [cand(n) for n in "abcd"]
    first = firsts(Router(Strategy.RANDOM, seed=7), pool, 400)
    again = firsts(Router(Strategy.RANDOM, seed=7), pool, 400)
    assert first == again
    assert set(first) == set("abcd") and min(first.values()) > 50


def test_round_robin_cycles_through_candidates_in_turn() -> None:
    router = Router(Strategy.ROUND_ROBIN)
    pool = [cand(n) for n in "cab"]
    order = [router.choose(pool, JOB, NOW)[0].peer_id for _ in range(6)]
    start = "abc".index(order[0])  # a random start, then peer-id order
    assert order == [("abc" * 3)[start + i] for i in range(6)]


def test_round_robin_clients_start_at_different_candidates() -> None:
    # the same list in the same order: equal starts would walk it in lockstep
    pool = [cand(f"p{i}") for i in range(10)]
    starts = {Router(Strategy.ROUND_ROBIN, seed=s).choose(pool, JOB, NOW)[0].peer_id
              for s in range(30)}
    assert len(starts) >= 5


def test_least_loaded_picks_the_lowest_load_per_slot() -> None:
    pool = [
        cand("a", slots=1, busy_slots=1),
        cand("b", slots=4, busy_slots=2),
        cand("c", slots=2, busy_slots=2, queue_len=1),
    ]
    assert [c.peer_id for c in Router(Strategy.LEAST_LOADED).choose(pool, JOB, NOW)] == [
        "b",
        "a",
        "c",
    ]


def test_least_loaded_counts_this_clients_own_jobs_in_flight() -> None:
    router = Router(Strategy.LEAST_LOADED)
    router.record_start("a", NOW)
    assert router.choose([cand("a"), cand("b")], JOB, NOW)[0].peer_id == "b"


def test_cheapest_picks_the_lowest_job_cost() -> None:
    pool = [cand("a", price_completion_per_1k=3000), cand("b", price_prompt_per_1k=1500), cand("c")]
    assert [c.peer_id for c in Router(Strategy.CHEAPEST).choose(pool, JOB, NOW)] == [
        "c",
        "b",
        "a",
    ]


def test_fastest_picks_the_lowest_score() -> None:
    pool = [cand("a", tokens_per_s=10.0), cand("b", tokens_per_s=80.0), cand("c")]
    assert [c.peer_id for c in Router(Strategy.FASTEST).choose(pool, JOB, NOW)] == [
        "b",
        "c",
        "a",
    ]


def test_power_of_two_never_picks_the_worst_and_spreads_over_the_rest() -> None:
    pool = [cand("slow", tokens_per_s=30.0), cand("mid", tokens_per_s=40.0), cand("fast")]
    counts = firsts(Router(Strategy.POWER_OF_TWO, seed=3), pool, 600)
    assert counts["slow"] == 0
    # the best wins both pairs it is drawn in (2/3), the middle one only against "slow"
    assert 330 < counts["fast"] < 470 and 130 < counts["mid"] < 270


def test_power_of_two_leaves_out_candidates_far_behind_the_best() -> None:
    router = Router(Strategy.POWER_OF_TWO, seed=3)
    slow = cand("slow", tokens_per_s=5.0)
    assert router.score(slow, JOB, NOW) > P2C_SCORE_CUTOFF * router.score(cand("x"), JOB, NOW)
    counts = firsts(router, [slow, cand("fast"), cand("fast2")], 300)
    assert counts["slow"] == 0 and min(counts["fast"], counts["fast2"]) > 100


def test_power_of_two_is_the_default_and_falls_back_by_score() -> None:
    router = Router(seed=5)
    assert router.strategy is Strategy.POWER_OF_TWO
    pool = [cand(n, tokens_per_s=10.0 * (i + 1)) for i, n in enumerate("abcd")]
    ordered = router.choose(pool, JOB, NOW)
    scores = [router.score(c, JOB, NOW) for c in ordered[1:]]
    assert scores == sorted(scores)


def test_single_candidate_is_chosen_by_every_strategy() -> None:
    for strategy in Strategy:
        assert [c.peer_id for c in Router(strategy, seed=0).choose([cand("a")], JOB, NOW)] == ["a"]


# ---------------------------------------------------------------------------- penalties


def test_a_failure_sends_the_provider_to_the_back() -> None:
    router = Router(Strategy.FASTEST)
    pool = [cand("a", tokens_per_s=80.0), cand("b")]
    assert router.choose(pool, JOB, NOW)[0].peer_id == "a"
    router.record_failure("a", NOW)
    assert router.choose(pool, JOB, NOW)[0].peer_id == "b"


def test_failure_penalty_halves_every_half_life() -> None:
    router = Router()
    router.record_failure("a", NOW)
    stats = router.stats("a")
    assert stats.penalty(NOW) == pytest.approx(FAILURE_PENALTY_S)
    assert stats.penalty(NOW + PENALTY_HALF_LIFE_S) == pytest.approx(FAILURE_PENALTY_S / 2)
    assert stats.penalty(NOW + 3 * PENALTY_HALF_LIFE_S) == pytest.approx(FAILURE_PENALTY_S / 8)


def test_a_recovered_provider_wins_again_once_its_penalty_decays() -> None:
    router = Router(Strategy.FASTEST)
    pool = [cand("a", tokens_per_s=80.0), cand("b")]
    router.record_failure("a", NOW)
    later = NOW + 10 * PENALTY_HALF_LIFE_S
    assert router.choose(pool, JOB, later)[0].peer_id == "a"


def test_repeated_failures_accumulate_up_to_a_ceiling() -> None:
    router = Router()
    router.record_failure("a", NOW)
    router.record_failure("a", NOW)
    assert router.stats("a").penalty(NOW) == pytest.approx(2 * FAILURE_PENALTY_S)
    for _ in range(100):
        router.record_failure("a", NOW)
    assert router.stats("a").penalty(NOW) == MAX_PENALTY_S


def test_bad_samples_are_refused() -> None:
    with pytest.raises(ValueError, match="rtt"):
        Router().record_rtt("a", float("nan"), NOW)
    with pytest.raises(ValueError, match="duration"):
        Router().record_success("a", NOW, duration_s=-1.0, completion_tokens=1)


# ---------------------------------------------------------------------------- persistence


def test_stats_survive_a_json_round_trip() -> None:
    router = Router()
    router.record_rtt("a", 0.05, NOW)
    router.record_success("a", NOW, duration_s=4.0, completion_tokens=100, first_token_s=0.5)
    router.record_failure("b", NOW)
    restored = Router()
    restored.import_stats(json.loads(json.dumps(router.export_stats())))
    for peer in ("a", "b"):
        assert restored.stats(peer) == router.stats(peer)
    assert restored.score(cand("b"), JOB, NOW) == router.score(cand("b"), JOB, NOW)


def test_jobs_in_flight_are_not_persisted() -> None:
    router = Router()
    router.record_start("a", NOW)
    restored = Router()
    restored.import_stats(router.export_stats())
    assert restored.stats("a").inflight == 0


@pytest.mark.parametrize(
    "data",
    [
        {"version": 99, "peers": {}},
        {"version": 1},
        {"version": 1, "peers": {"a": {"rtt_s": 0.1}}},
        {"version": 1, "peers": {"a": {**Router().stats("a").to_dict(), "rtt_s": "fast"}}},
        {"version": 1, "peers": {"a": {**Router().stats("a").to_dict(), "failures": -1}}},
        {"version": 1, "peers": {"a": {**Router().stats("a").to_dict(), "extra": 1}}},
    ],
)
def test_malformed_stats_are_refused_and_change_nothing(data: dict[str, object]) -> None:
    router = Router()
    router.record_failure("keep", NOW)
    before = router.export_stats()
    with pytest.raises(StatsFormatError):
        router.import_stats(data)
    assert router.export_stats() == before


def test_abandoned_job_frees_inflight_without_penalty() -> None:
    router = Router(seed=1)
    router.record_start("p", 0.0)
    assert router.stats("p").inflight == 1
    router.record_abandoned("p", 1.0)
    stats = router.stats("p")
    assert stats.inflight == 0 and stats.failures == 0 and stats.penalty(1.0) == 0.0


# ---------------------------------------------------------------------------- exploration


def run_jobs(router: Router, pool: list[Candidate], real_speed: dict[str, float], n: int,
             now: float = NOW) -> list[str]:
    """n jobs one after another; each provider really decodes at ``real_speed``."""
    chosen = []
    for i in range(n):
        first = router.choose(pool, JOB, now + i)[0].peer_id
        router.record_start(first, now + i)
        speed = real_speed[first]
        router.record_success(first, now + i, duration_s=0.01 + JOB.completion_tokens / speed,
                              completion_tokens=JOB.completion_tokens, first_token_s=0.01,
                              rtt_sample_s=0.01)
        chosen.append(first)
    return chosen


def measured_router(peer: str = "old", speed: float = 50.0, jobs: int = 3) -> Router:
    router = Router(seed=1)
    run_jobs(router, [cand(peer, tokens_per_s=speed)], {peer: speed}, jobs)
    return router


@pytest.mark.parametrize("advertised", [0.0, 40.0])  # never ran a job; a bit slower
def test_a_new_provider_gets_a_job_within_its_first_two_requests_beside_a_measured_one(
    advertised: float,
) -> None:
    router = measured_router()
    pool = [cand("old", tokens_per_s=50.0), cand("new", tokens_per_s=advertised)]
    chosen = run_jobs(router, pool, {"old": 50.0, "new": 50.0}, 2, now=NOW + 100)
    assert "new" in chosen


def test_an_advert_of_zero_speed_is_scored_like_the_median_measured_provider() -> None:
    router = measured_router()
    pool = [cand("old", tokens_per_s=50.0), cand("new", tokens_per_s=0.0)]
    reference = router.reference(pool)
    assert reference is not None
    assert router.speed(pool[1], reference) == pytest.approx(router.stats("old").tokens_per_s)
    assert router.score(pool[1], JOB, NOW, reference) < P2C_SCORE_CUTOFF * router.score(
        pool[0], JOB, NOW, reference)


def test_an_advert_lying_about_its_speed_loses_its_traffic_after_one_job() -> None:
    router = measured_router()
    pool = [cand("old", tokens_per_s=50.0), cand("liar", tokens_per_s=100_000.0)]
    capped = router.speed(pool[1], router.reference(pool))
    assert capped == pytest.approx(router.speed(pool[0]))  # no better than the best measured
    chosen = run_jobs(router, pool, {"old": 50.0, "liar": 5.0}, 50, now=NOW + 100)
    assert chosen.count("liar") == 1


def test_an_unexplored_provider_with_a_probe_in_flight_is_only_a_fallback() -> None:
    router = measured_router(jobs=20)  # probes are due: only the in-flight one holds back
    pool = [cand("old", tokens_per_s=50.0), cand("new", tokens_per_s=0.0)]
    assert router.choose(pool, JOB, NOW)[0].peer_id == "new"
    router.record_start("new", NOW)
    assert [c.peer_id for c in router.choose(pool, JOB, NOW)] == ["old", "new"]


def test_a_flood_of_new_providers_gets_a_bounded_share_of_the_jobs() -> None:
    router = measured_router()
    sybils = {f"new{i:02d}": 50.0 for i in range(40)}
    pool = [cand("old", tokens_per_s=50.0), *(cand(p, tokens_per_s=0.0) for p in sybils)]
    chosen = run_jobs(router, pool, {"old": 50.0, **sybils}, 50, now=NOW + 100)
    probed = {p for p in chosen if p in sybils}  # each one's first job was its probe
    assert len(probed) >= 5  # new providers do get work
    # one job in five, counting the measured provider's first three: (50 + 3) / 5 + 1
    assert len(probed) <= 11


def test_clients_sharing_a_directory_probe_different_new_providers() -> None:
    # 40 clients of one city see the same adverts: if each probed the best-scored new
    # provider, all 40 probes would land on one of them (the 10k-provider lab run
    # failed 17,240 of 90,000 jobs as busy that way).
    fresh = [f"new{i:02d}" for i in range(40)]
    pool = [cand("old", tokens_per_s=50.0), *(cand(p, tokens_per_s=50.0) for p in fresh)]
    probes = []
    for seed in range(40):
        router = Router(seed=seed)
        run_jobs(router, [pool[0]], {"old": 50.0}, 3)
        probes.append(router.choose(pool, JOB, NOW + 100)[0].peer_id)
    assert all(p in fresh for p in probes)
    assert len(set(probes)) >= 15  # 40 draws from 40: ~25 distinct expected




# ------------------------------------------------------------------ tables and rank()


def varied_pool(n: int) -> list[Candidate]:
    return [
        cand(f"p{i:03d}", tokens_per_s=10.0 + (i * 37) % 90, busy_slots=i % 2, queue_len=i % 3,
             price_completion_per_1k=1000 + (i * 53) % 7 * 500)
        for i in range(n)
    ]


@pytest.mark.parametrize("strategy", list(Strategy))
def test_rank_over_a_table_orders_like_choose_over_the_list(strategy: Strategy) -> None:
    pool = varied_pool(40)
    by_list = Router(strategy, seed=9)
    by_table = Router(strategy, seed=9)
    for router in (by_list, by_table):
        router.record_rtt("p007", 0.01, NOW)
        router.record_failure("p003", NOW)
    table = CandidateTable(pool)
    for _ in range(3):
        listed = [c.peer_id for c in by_list.choose(pool, JOB, NOW)]
        ranked = [table.peer_id(r) for r in by_table.rank(table, JOB, NOW)]
        assert ranked == listed


@pytest.mark.parametrize("strategy", [s for s in Strategy if s is not Strategy.RANDOM])
def test_a_limited_rank_is_the_prefix_of_the_full_one(strategy: Strategy) -> None:
    # many exact ties (same speed and load): the prefix must break them the same way
    pool = varied_pool(60) + [cand(f"tie{i:02d}") for i in range(30)]
    table = CandidateTable(pool)
    full = Router(strategy, seed=4).rank(table, JOB, NOW)
    for limit in (1, 3, 17):
        assert Router(strategy, seed=4).rank(table, JOB, NOW, limit=limit) == full[:limit]


def test_rank_leaves_out_excluded_peers_and_expired_adverts() -> None:
    table = CandidateTable()
    table.upsert(cand("a", tokens_per_s=90.0), expires_at=NOW + 10)
    table.upsert(cand("b", tokens_per_s=60.0), expires_at=NOW - 1)
    table.upsert(cand("c", tokens_per_s=30.0))
    router = Router(Strategy.FASTEST)
    assert [table.peer_id(r) for r in router.rank(table, JOB, NOW)] == ["a", "c"]
    assert [table.peer_id(r) for r in router.rank(table, JOB, NOW, exclude={"a"})] == ["c"]


def test_table_rows_are_replaced_in_place_and_removed_by_peer() -> None:
    table = CandidateTable([cand("a"), cand("b"), cand("c")])
    table.upsert(cand("a", busy_slots=1))
    assert len(table) == 3 and table.candidate(table.row_of("a") or 0).busy_slots == 1
    assert table.remove("a") and not table.remove("a")
    assert sorted(table.peer_id(r) for r in range(len(table))) == ["b", "c"]
    router = Router(Strategy.LEAST_LOADED)
    assert {table.peer_id(r) for r in router.rank(table, JOB, NOW)} == {"b", "c"}


def explored_router(strategy: Strategy, seed: int) -> Router:
    """A router that measured some of ``varied_pool``'s providers (enough jobs that a
    probe is due) and has a probe in flight to one it has not."""
    router = Router(strategy, seed=seed)
    for i in range(0, 40, 7):
        peer = f"p{i:03d}"
        for _ in range(5):
            router.record_start(peer, NOW)
            router.record_success(peer, NOW, duration_s=2.0 + i / 10, completion_tokens=200,
                                  first_token_s=0.1, rtt_sample_s=0.02 + i / 1000)
    router.record_start("p011", NOW)  # the probe in flight
    return router


def test_exploration_over_a_table_probes_first_and_keeps_the_limited_prefix() -> None:
    pool = varied_pool(40)
    table = CandidateTable(pool)
    full = explored_router(Strategy.POWER_OF_TWO, 4).rank(table, JOB, NOW)
    assert sorted(full) == list(range(40))
    router = explored_router(Strategy.POWER_OF_TWO, 4)
    first = table.peer_id(full[0])
    assert not router.explored(first) and first != "p011"  # a probe, not the one in flight
    measured = [table.peer_id(r) for r in full[1:7]]
    assert all(router.explored(p) for p in measured)  # then the measured ones
    for limit in (1, 2, 5, 17):
        assert explored_router(Strategy.POWER_OF_TWO, 4).rank(
            table, JOB, NOW, limit=limit) == full[:limit]
    listed = explored_router(Strategy.POWER_OF_TWO, 4).choose(pool, JOB, NOW)
    assert [c.peer_id for c in listed] == [table.peer_id(r) for r in full]


# ---------------------------------------------------------------- unreachable cooldown


@pytest.mark.parametrize("strategy", list(Strategy))
def test_a_provider_whose_dial_failed_is_not_chosen_while_another_is_eligible(
    strategy: Strategy,
) -> None:
    # "a" is far faster and cheaper: the failure penalty alone would not outweigh that.
    pool = [cand("a", tokens_per_s=1000.0, price_completion_per_1k=1), cand("b")]
    router = Router(strategy=strategy, seed=1)
    router.record_start("a", NOW)
    router.record_unreachable("a", NOW)
    for _ in range(20):
        assert [c.peer_id for c in router.choose(pool, JOB, NOW + 1)] == ["b", "a"]
    table = CandidateTable(pool)
    assert [table.candidate(r).peer_id for r in router.rank(table, JOB, NOW + 1, limit=1)] \
        == ["b"]


def test_a_cooling_provider_is_still_tried_when_it_is_the_only_one() -> None:
    router = Router()
    router.record_unreachable("a", NOW)
    assert [c.peer_id for c in router.choose([cand("a")], JOB, NOW + 1)] == ["a"]
    router.record_unreachable("b", NOW + 2)  # the sooner to recover comes first
    pool = [cand("a"), cand("b")]
    assert [c.peer_id for c in router.choose(pool, JOB, NOW + 3)] == ["a", "b"]


def test_the_cooldown_doubles_on_repeated_failures_and_ends() -> None:
    from meshnode.core.router import MAX_UNREACHABLE_COOLDOWN_S, UNREACHABLE_COOLDOWN_S

    router = Router()
    router.record_unreachable("a", NOW)
    assert router.cooling_down("a", NOW + UNREACHABLE_COOLDOWN_S - 1)
    assert not router.cooling_down("a", NOW + UNREACHABLE_COOLDOWN_S)
    later = NOW + UNREACHABLE_COOLDOWN_S
    router.record_unreachable("a", later)
    assert router.cooling_down("a", later + 2 * UNREACHABLE_COOLDOWN_S - 1)
    assert not router.cooling_down("a", later + 2 * UNREACHABLE_COOLDOWN_S)
    for _ in range(20):
        router.record_unreachable("a", later)
    assert router.stats("a").cooldown_s == MAX_UNREACHABLE_COOLDOWN_S


def test_a_success_or_a_newer_advert_ends_the_cooldown() -> None:
    router = Router()
    router.note_advert("a", 5)
    router.record_unreachable("a", NOW)
    router.note_advert("a", 5)  # the same advert again says nothing new
    assert router.cooling_down("a", NOW + 1)
    router.note_advert("a", 6)
    assert not router.cooling_down("a", NOW + 1)
    router.record_unreachable("a", NOW + 2)
    router.record_unreachable("a", NOW + 3)
    router.record_start("a", NOW + 4)
    router.record_success("a", NOW + 5, duration_s=1.0, completion_tokens=3)
    assert not router.cooling_down("a", NOW + 6)
    router.record_unreachable("a", NOW + 7)  # the doubling starts over
    assert not router.cooling_down("a", NOW + 7 + 30.0)


def test_a_provider_that_answered_and_failed_mid_stream_does_not_cool_down() -> None:
    router = Router()
    router.record_failure("a", NOW)
    assert not router.cooling_down("a", NOW + 1)
