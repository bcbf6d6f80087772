"""Linux network namespaces joined by one bridge, with per-destination delays.

Layout for ``n`` nodes, all named with ``prefix`` so a crashed run can be cleaned up::

    {prefix}-hub : bridge br0, one veth end per node
    {prefix}-N   : eth0 = 10.77.0.(N+1)/24, its peer end on br0

Nothing touches the root namespace: the bridge lives in the hub namespace, and the veth
pairs are created there with one end moved straight into the node's namespace. Delays
are ``tc netem`` on each node's egress, one HTB class per destination address, so the
path a→b can be delayed differently from a→c (a city-to-city latency matrix).

Needs root and iproute2 (``ip``, ``tc``). Every command is bounded by a timeout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

SUBNET = "10.77.0"  # a private /24 no other part of this machine uses
CMD_TIMEOUT_S = 10.0  # ip/tc calls are instant; a hang means a broken kernel setup
MAX_NODES = 64  # one /24 and one HTB class per destination per node stay small
LINK_RATE = "10gbit"  # high enough that only the netem delay shapes traffic


class NetnsUnavailable(RuntimeError):
    """This machine cannot run the namespace lab (not root, or no iproute2)."""


def check_available() -> None:
    """Raise ``NetnsUnavailable`` with the reason if namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (run as root)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsUnavailable(f"{tool!r} not found: install iproute2")


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), check=check, capture_output=True, text=True, timeout=CMD_TIMEOUT_S
    )


@dataclass
class NetnsLab:
    nodes: int
    prefix: str = "mlab"
    created: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"nodes must be 1..{MAX_NODES}, got {self.nodes}")

    def ns(self, i: int) -> str:
        return f"{self.prefix}-{i}"

    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def __enter__(self) -> NetnsLab:
        check_available()
        self.cleanup_stale()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cleanup_stale(self) -> None:
        """Delete namespaces of this prefix left by a run that was killed."""
        listed = _run(["ip", "netns", "list"], check=False).stdout.split()
        for name in listed:
            if name.startswith(f"{self.prefix}-"):
                _run(["ip", "netns", "del", name], check=False)

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _setup(self) -> None:
        self._add_ns(self.hub)
        _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
        for i in range(self.nodes):
            name = self.ns(i)
            self._add_ns(name)
            port = f"p{i}"
            _run(["ip", "-n", self.hub, "link", "add", port, "type", "veth",
                  "peer", "name", "eth0", "netns", name])
            _run(["ip", "-n", self.hub, "link", "set", port, "master", "br0", "up"])
            _run(["ip", "-n", name, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0"])
            _run(["ip", "-n", name, "link", "set", "eth0", "up"])

    def set_delays(self, one_way_ms: Sequence[Sequence[float]]) -> None:
        """``one_way_ms[a][b]``: delay added to every packet from node a to node b."""
        for a in range(self.nodes):
            name = self.ns(a)
            _run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "eth0",
                  "root", "handle", "1:", "htb", "default", "9999"])
            for b in range(self.nodes):
                if a == b:
                    continue
                cls = f"1:{b + 1}"
                _run(["ip", "netns", "exec", name, "tc", "class", "add", "dev", "eth0",
                      "parent", "1:", "classid", cls, "htb", "rate", LINK_RATE])
                _run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "eth0",
                      "parent", cls, "handle", f"{b + 10}:", "netem",
                      "delay", f"{one_way_ms[a][b]:.3f}ms", "limit", "100000"])
                _run(["ip", "netns", "exec", name, "tc", "filter", "add", "dev", "eth0",
                      "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                      "match", "ip", "dst", f"{self.ip(b)}/32", "flowid", cls])

    def ping_ms(self, a: int, b: int) -> float:
        """One ping's RTT from node a to node b (checks the delays are in place)."""
        res = _run(["ip", "netns", "exec", self.ns(a), "ping", "-c", "1", "-W", "2",
                    self.ip(b)], check=False)
        for part in res.stdout.split():
            if part.startswith("time="):
                return float(part[5:])
        raise RuntimeError(f"no ping reply {a}->{b}: {res.stdout} {res.stderr}")

    def popen(self, i: int, argv: Sequence[str], log: str) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.ns(i), *argv],
                                    stdout=out, stderr=subprocess.STDOUT)

    def close(self) -> None:
        for name in reversed(self.created):
            _run(["ip", "netns", "del", name], check=False)
        self.created.clear()
