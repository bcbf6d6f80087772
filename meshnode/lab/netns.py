"""Linux network namespaces joined by a userspace router that delays every packet by a
per-pair latency (a city-to-city matrix).

Each node gets its own namespace ``{prefix}-N`` with one TUN device ``tun0`` holding
10.77.0.(N+1)/24. The lab process opens every ``tun0`` (entering each namespace just for
the open) and forwards IPv4 packets between them: a packet from node a to node b is
written to b's device ``one_way_ms[a][b]`` after it was read. Nothing touches the root
namespace, and traffic can only flow between the namespaces made here.

Why not ``tc netem``: the kernel of the machines this project runs on has no
``sch_netem`` (``tc qdisc add ... netem`` answers "Specified qdisc kind is unknown"),
and no way to load it. The router is the same idea in userspace: a delay line per path.
Not modelled: loss, jitter, bandwidth limits, reordering.

Needs root and iproute2. Every ``ip`` call is bounded by a timeout; ``close`` deletes the
namespaces (which removes their devices) and stops the router thread.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import os
import selectors
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

SUBNET = "10.77.0"  # a private /24 no other part of this machine uses
CMD_TIMEOUT_S = 10.0  # ip calls are instant; a hang means a broken kernel setup
MAX_NODES = 64  # one /24; each node costs one file descriptor in the router
MTU = 1500  # an Ethernet-sized MTU, as on the WAN paths being emulated
MAX_QUEUED_PACKETS = 200_000  # ~300 MB at MTU; far above what the lab's jobs send
PROBE_PORT = 9  # "discard": nothing listens on it in a lab namespace, so connects are refused
_CLONE_NEWNET = 0x40000000
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_IPV4 = 4


class NetnsUnavailable(RuntimeError):
    """This machine cannot run the namespace lab (not root, no iproute2, no TUN)."""


def check_available() -> None:
    """Raise ``NetnsUnavailable`` with the reason if namespaces cannot be made here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (run as root)")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("'ip' not found: install iproute2")
    if not os.path.exists("/dev/net/tun"):
        raise NetnsUnavailable("/dev/net/tun is missing: the kernel has no TUN support")


def _run(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), check=check, capture_output=True, text=True, timeout=CMD_TIMEOUT_S
    )


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns failed: {os.strerror(err)}")


def _open_tun_in(ns: str) -> int:
    """Create ``tun0`` inside namespace ``ns`` and return its descriptor."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", b"tun0", _IFF_TUN | _IFF_NO_PI))
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)
    return fd


@dataclass
class DelayRouter:
    """Forwards IPv4 packets between TUN descriptors after a per-pair delay."""

    fds: list[int]
    one_way_s: list[list[float]]
    forwarded: int = 0
    dropped: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="delay-router", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _loop(self) -> None:
        index = {fd: i for i, fd in enumerate(self.fds)}
        sel = selectors.DefaultSelector()
        for fd in self.fds:
            sel.register(fd, selectors.EVENT_READ)
        queue: list[tuple[float, int, int, bytes]] = []
        seq = 0
        prefix = bytes(int(x) for x in SUBNET.split("."))
        while not self._stop.is_set():
            now = time.monotonic()
            while queue and queue[0][0] <= now:
                _, _, dst, pkt = heapq.heappop(queue)
                try:
                    os.write(self.fds[dst], pkt)
                    self.forwarded += 1
                except OSError:
                    self.dropped += 1
            timeout = 0.05 if not queue else max(0.0, queue[0][0] - time.monotonic())
            for key, _ in sel.select(min(timeout, 0.05)):
                fd = key.fd
                src = index[fd]
                while True:
                    try:
                        pkt = os.read(fd, MTU + 64)
                    except BlockingIOError:
                        break
                    except OSError:
                        break
                    if len(pkt) < 20 or pkt[0] >> 4 != _IPV4 or pkt[16:19] != prefix:
                        continue  # IPv6 router solicitations and the like: not ours
                    dst = pkt[19] - 1
                    if not 0 <= dst < len(self.fds) or dst == src:
                        self.dropped += 1
                        continue
                    if len(queue) >= MAX_QUEUED_PACKETS:
                        self.dropped += 1
                        continue
                    seq += 1
                    due = time.monotonic() + self.one_way_s[src][dst]
                    heapq.heappush(queue, (due, seq, dst, pkt))
        sel.close()


@dataclass
class NetnsLab:
    nodes: int
    prefix: str = "mlab"
    created: list[str] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    router: DelayRouter | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"nodes must be 1..{MAX_NODES}, got {self.nodes}")

    def ns(self, i: int) -> str:
        return f"{self.prefix}-{i}"

    def ip(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def __enter__(self) -> NetnsLab:
        check_available()
        self.cleanup_stale()
        try:
            for i in range(self.nodes):
                name = self.ns(i)
                _run(["ip", "netns", "add", name])
                self.created.append(name)
                _run(["ip", "-n", name, "link", "set", "lo", "up"])
                self.fds.append(_open_tun_in(name))
                _run(["ip", "-n", name, "addr", "add", f"{self.ip(i)}/24", "dev", "tun0"])
                _run(["ip", "-n", name, "link", "set", "tun0", "mtu", str(MTU), "up"])
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

    def set_delays(self, one_way_ms: Sequence[Sequence[float]]) -> None:
        """``one_way_ms[a][b]``: delay added to every packet from node a to node b.
        Starts the router; call once."""
        if self.router is not None:
            raise RuntimeError("delays are already set")
        delays = [[float(one_way_ms[a][b]) / 1e3 for b in range(self.nodes)]
                  for a in range(self.nodes)]
        self.router = DelayRouter(self.fds, delays)
        self.router.start()

    def ping_ms(self, a: int, b: int) -> float:
        """RTT from node a to node b, best of three (checks the delays are in place):
        a TCP connect to a closed port of b, which b's kernel refuses one RTT later.
        (No ``ping`` binary is needed.)"""
        probe = (
            "import socket,time\n"
            "best=1e9\n"
            "for _ in range(3):\n"
            " s=socket.socket(); s.settimeout(3); t=time.perf_counter()\n"
            f" try: s.connect(('{self.ip(b)}', {PROBE_PORT}))\n"
            " except OSError: pass\n"
            " best=min(best,time.perf_counter()-t); s.close()\n"
            "print(best*1e3)\n"
        )
        res = _run(["ip", "netns", "exec", self.ns(a), sys.executable, "-c", probe])
        return float(res.stdout.strip())

    def popen(self, i: int, argv: Sequence[str], log: str) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.ns(i), *argv],
                                    stdout=out, stderr=subprocess.STDOUT)

    def close(self) -> None:
        if self.router is not None:
            self.router.stop()
            self.router = None
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
        for name in reversed(self.created):
            _run(["ip", "netns", "del", name], check=False)
        self.created.clear()
