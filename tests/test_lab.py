"""The routing lab: scenarios, the simulator end to end on a small mesh, its metrics."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from nacl.signing import SigningKey

from meshnode.core.advert import (
    Advert,
    AdvertRejected,
    Capacity,
    Load,
    ModelOffer,
    RejectReason,
    encode_signed,
)
from meshnode.core.peerid import peer_id_from_ed25519
from meshnode.lab.gossip import VerifyOnce
from meshnode.lab.metrics import jain_index, summarize
from meshnode.lab.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from meshnode.lab.sim import MODEL_ID, Simulation

SMALL = Path(__file__).resolve().parents[1] / "bench" / "scenarios" / "small.toml"


@pytest.fixture(scope="module")
def tiny() -> Scenario:
    # the committed small scenario, cut down further so each run takes about a second
    return load_scenario(SMALL).with_overrides(providers=24, clients=8, jobs=500)


def test_the_same_seed_gives_the_same_run(tiny: Scenario) -> None:
    a = Simulation(tiny, "p2c").run()
    b = Simulation(tiny, "p2c").run()
    c = Simulation(tiny, "p2c", seed=tiny.seed + 1).run()
    assert np.array_equal(a.finish, b.finish, equal_nan=True)
    assert np.array_equal(a.served_by, b.served_by)
    assert not np.array_equal(a.finish, c.finish, equal_nan=True)


def test_every_job_ends_once_with_consistent_times(tiny: Scenario) -> None:
    out = Simulation(tiny, "least_loaded").run()
    done = np.isfinite(out.finish)
    assert done.sum() + out.counters["jobs_failed"] == tiny.jobs
    assert np.all(out.ttft[done] > 0) and np.all(out.ttft[done] <= out.finish[done])
    assert np.all(out.attempts[done] >= 1)
    assert np.all(out.served_by[done] >= 0) and np.all(out.served_by[~done] == -1)
    # every job that finished paid for the tokens it got
    assert np.all(out.cost[done] > 0) and np.all(out.tokens[done] > 0)


def test_queue_waits_and_picks_of_busy_providers_are_counted(tiny: Scenario) -> None:
    out = Simulation(tiny.with_overrides(load=0.85), "random").run()
    done = np.isfinite(out.finish)
    assert np.all(out.queue_wait[done] >= 0) and np.all(out.queue_wait[done] < out.finish[done])
    counters = out.counters
    assert counters["picks"] == out.attempts.sum()  # one pick per attempt
    assert 0 < counters["picks_busy"] < counters["picks"]  # blind choice hits busy ones
    assert 0 < counters["picks_listed_busy"] < counters["picks"]
    assert 0 < summarize(out)["jobs_queued_share"] < 1


def test_the_oracle_beats_blind_random_choice_at_the_tail(tiny: Scenario) -> None:
    loaded = tiny.with_overrides(load=0.85)
    oracle = summarize(Simulation(loaded, "oracle").run())
    blind = summarize(Simulation(loaded, "random").run())
    assert oracle["finish_s"]["p99"] < blind["finish_s"]["p99"]
    assert oracle["jobs_failed"] <= blind["jobs_failed"]


def test_cheapest_pays_least_and_spreads_worst(tiny: Scenario) -> None:
    runs = {s: summarize(Simulation(tiny, s).run()) for s in ("cheapest", "p2c", "random")}
    costs = {s: r["cost_ton_per_1m_tokens"] for s, r in runs.items()}
    assert min(costs, key=lambda s: costs[s]) == "cheapest"
    jain = {s: r["jain_utilisation"] for s, r in runs.items()}
    assert min(jain, key=lambda s: jain[s]) == "cheapest"


def test_a_full_directory_hides_providers_from_clients(tiny: Scenario) -> None:
    capped = tiny.with_overrides(directory_max_entries=6)
    sim = Simulation(capped, "random")
    out = sim.run()
    listed = set().union(*(set(v.row_provider) for v in sim.views.values()))
    served = set(out.served_by[out.served_by >= 0].tolist())
    assert served and served <= listed
    assert len(listed) < tiny.providers
    rejected = sum(v.directory.counters()["directory_full"] for v in sim.views.values())
    assert rejected > 0


def test_jain_index_is_one_for_equal_shares_and_one_over_n_for_a_monopoly() -> None:
    assert jain_index(np.array([0.5, 0.5, 0.5])) == pytest.approx(1.0)
    assert jain_index(np.array([1.0, 0.0, 0.0, 0.0])) == pytest.approx(0.25)
    assert 0.25 < jain_index(np.array([1.0, 0.5, 0.0, 0.0])) < 1.0


def test_scenario_errors_name_the_field(tmp_path: Path) -> None:
    import tomllib

    raw = tomllib.loads(SMALL.read_text())
    raw["mesh"]["load"] = 7
    with pytest.raises(ScenarioError, match=r"\[mesh\] load=7"):
        parse_scenario(raw, base=SMALL.parent)
    raw["mesh"]["load"] = 0.5
    del raw["sources"]
    with pytest.raises(ScenarioError, match="sources"):
        parse_scenario(raw, base=SMALL.parent)
    assert dataclasses.is_dataclass(load_scenario(SMALL))


def test_a_scenarios_what_if_table_sets_the_router_and_directory_knobs() -> None:
    import tomllib

    raw = tomllib.loads(SMALL.read_text())
    raw["what_if"] = {"p2c_score_cutoff": 1.5, "max_probe_share": 0.5, "spread_probes": False,
                      "directory_rate_per_s": 2.0, "max_attempts": 8}
    sc = parse_scenario(raw, base=SMALL.parent)
    assert (sc.p2c_score_cutoff, sc.max_probe_share, sc.spread_probes) == (1.5, 0.5, False)
    assert (sc.directory_rate_per_s, sc.max_attempts) == (2.0, 8)
    raw["what_if"] = {"spread_probes": 0}
    with pytest.raises(ScenarioError, match="spread_probes must be true or false"):
        parse_scenario(raw, base=SMALL.parent)


def _advert(seed: bytes, now: float) -> bytes:
    pub = bytes(SigningKey(seed).verify_key)
    advert = Advert(
        peer_id=peer_id_from_ed25519(pub), peer_pubkey=pub, addrs=(),
        models=(ModelOffer(MODEL_ID, "m", "Q4_0", 512, 1, 1),),
        capacity=Capacity(1, 10.0), load=Load(0, 0), job_pubkey=b"\x01" * 32, seq=1,
        issued_at=now, expires_at=now + 60,
    )
    return encode_signed(advert, seed)


def test_verify_once_checks_each_advert_once_but_its_expiry_every_time() -> None:
    decode = VerifyOnce(deliveries=3)
    data = _advert(b"\x05" * 32, 100.0)
    assert decode(data, 100.0).seq == 1
    assert decode(data, 101.0).seq == 1
    assert decode.verified == 1
    with pytest.raises(AdvertRejected) as exc:
        decode(data, 1000.0)  # the third city gets it after it expired
    assert exc.value.reason is RejectReason.EXPIRED
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(AdvertRejected):
        decode(tampered, 100.0)


def test_what_if_knobs_default_to_the_nodes_own_values(tiny: Scenario) -> None:
    from meshnode.node import ADVERT_LIFETIME_S
    from meshnode.p2p.discovery import LOAD_PUBLISH_MIN_INTERVAL_S
    from meshnode.p2p.host import DIAL_TIMEOUT_S

    assert tiny.dial_timeout_s == DIAL_TIMEOUT_S
    assert tiny.advert_lifetime_s == ADVERT_LIFETIME_S
    assert tiny.load_publish_interval_s == LOAD_PUBLISH_MIN_INTERVAL_S
    from meshnode.core.directory import RATE_PER_S
    from meshnode.core.router import MAX_PROBE_SHARE, P2C_SCORE_CUTOFF
    from meshnode.jobs.routed import DEFAULT_MAX_ATTEMPTS

    assert (tiny.p2c_score_cutoff, tiny.max_probe_share) == (P2C_SCORE_CUTOFF, MAX_PROBE_SHARE)
    assert tiny.directory_rate_per_s == RATE_PER_S and tiny.spread_probes
    assert tiny.max_attempts == DEFAULT_MAX_ATTEMPTS


def test_router_and_directory_what_ifs_reach_the_nodes_own_objects(tiny: Scenario) -> None:
    what_if = tiny.with_overrides(p2c_score_cutoff=1.25, max_probe_share=0.5,
                                  directory_rate_per_s=1.0, spread_probes=False)
    sim = Simulation(what_if, "p2c")
    router = sim.routers[0]
    assert (router.p2c_score_cutoff, router.max_probe_share) == (1.25, 0.5)
    assert not router.spread_probes
    assert all(v.directory.rate_per_s == 1.0 for v in sim.views.values())


def test_a_job_is_offered_to_at_most_max_attempts_providers(tiny: Scenario) -> None:
    # queues of 0 at a load near capacity: many jobs are refused by every provider tried
    out = Simulation(tiny.with_overrides(max_queue=0, load=1.2, max_attempts=2), "p2c").run()
    assert out.attempts.max() == 2 and out.counters["jobs_failed"] > 0


def test_a_shorter_advert_lifetime_shows_in_the_adverts_clients_hold(tiny: Scenario) -> None:
    sim = Simulation(tiny.with_overrides(advert_lifetime_s=42.0, jobs=50), "p2c")
    sim.run()
    view = next(iter(sim.views.values()))
    listing = view.directory.peers(0.0)[0]
    assert listing.advert.expires_at - listing.advert.issued_at == 42.0
