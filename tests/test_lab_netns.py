"""The routing lab's namespace harness: namespaces, TUN devices, the delay router."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from meshnode.lab.netns import NetnsLab, NetnsUnavailable, check_available

try:
    check_available()
    REASON = ""
except NetnsUnavailable as exc:
    REASON = str(exc)

NETNS_SCENARIO = Path(__file__).resolve().parents[1] / "bench" / "scenarios" / "netns_small.toml"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(REASON), reason=REASON)]


def _namespaces() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                          check=True).stdout.split()


def test_each_path_gets_its_own_delay_and_everything_is_removed_after() -> None:
    one_way = [[0.0, 30.0, 80.0], [30.0, 0.0, 5.0], [80.0, 5.0, 0.0]]
    with NetnsLab(3, prefix="mlabtest") as lab:
        lab.set_delays(one_way)
        for a, b in ((0, 1), (0, 2), (1, 2)):
            rtt = lab.ping_ms(a, b)
            expected = one_way[a][b] + one_way[b][a]
            # the router adds its own sub-millisecond scheduling delay on top
            assert expected <= rtt < expected + 15.0, (a, b, rtt)
        assert lab.router is not None and lab.router.forwarded > 0
    assert not [n for n in _namespaces() if n.startswith("mlabtest-")]


def test_a_lab_namespace_routes_only_to_the_lab_subnet() -> None:
    with NetnsLab(1, prefix="mlabtest") as lab:
        routes = subprocess.run(["ip", "-n", lab.ns(0), "-4", "route", "show"],
                                capture_output=True, text=True, check=True).stdout
        assert [line.split()[0] for line in routes.splitlines()] == ["10.77.0.0/24"]


def test_real_nodes_in_namespaces_run_the_scenarios_jobs(tmp_path: Path) -> None:
    from meshnode.lab.real import run_real
    from meshnode.lab.scenario import load_scenario
    from meshnode.lab.sim import Simulation

    sc = load_scenario(NETNS_SCENARIO).with_overrides(providers=2, clients=1, jobs=4, load=0.2)
    real = run_real(sc, "p2c", tmp_path)
    assert real["known_providers"] == [2]
    records = sorted(real["records"], key=lambda r: r["job"])
    assert [r["job"] for r in records] == [0, 1, 2, 3]
    planned = Simulation(sc, "p2c").jobs.completion  # the jobs the simulator would run
    done = [r for r in records if r.get("finish_s") is not None]
    assert done, records
    for r in done:
        assert r["completion_tokens"] == int(planned[r["job"]])
        assert 0 < r["ttft_s"] <= r["finish_s"]
    assert not [n for n in _namespaces() if n.startswith("mlab-")]
