"""The routing lab's namespace harness: namespaces, TUN devices, the delay router."""

from __future__ import annotations

import subprocess

import pytest

from meshnode.lab.netns import NetnsLab, NetnsUnavailable, check_available

try:
    check_available()
    REASON = ""
except NetnsUnavailable as exc:
    REASON = str(exc)

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
