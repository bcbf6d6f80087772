"""Redial storm: dials a node makes to clients that connected once and left.

A node (``make_host``, as ``meshnode serve`` builds it) accepts ``--clients`` light
clients, one after another; each runs one echo round trip, lingers a moment (identify
runs) and exits. Then the node is watched for ``--window`` seconds and every
``Swarm.dial_peer`` call is counted.

- ``after``: the node as built today (py-libp2p's auto-connector switched off by
  ``meshnode.p2p.limits``).
- ``before``: the same node with py-libp2p 0.8.1's auto-connector put back as it ran
  before issue 13 (it aims for (low + high watermark) / 2 connections and dials every
  peer in the peerstore; departed peers are backed off 60 s, then tried on each 30 s tick).

Everything runs in one process on 127.0.0.1. Writes bench/results/redial_storm.json.

Usage: python bench/redial_storm.py [--clients 30] [--window 150] [--only before|after]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.auto_connector import AutoConnector
from libp2p.peer.id import ID

from meshnode.identity import NodeIdentity
from meshnode.p2p.host import full_addrs, parse_peer_addr, running_host

RESULTS = Path(__file__).resolve().parent / "results" / "redial_storm.json"
ECHO = TProtocol("/meshnode-bench/echo/1")
DEFAULT_CLIENTS = 30
# The auto-connector backs a departed peer off for 60 s, then dials on 30 s ticks:
# 150 s sees the first two or three rounds.
DEFAULT_WINDOW_S = 150.0
STEP_TIMEOUT_S = 10.0  # one client's connect + echo on loopback


async def _echo(stream: INetStream) -> None:
    await stream.write(await stream.read(64))
    await stream.close()


async def measure(clients: int, window_s: float, before: bool) -> dict[str, Any]:
    async with running_host(NodeIdentity.generate()) as node:
        node.set_stream_handler(ECHO, _echo)
        network: Any = node.get_network()
        if before:
            connector = network.auto_connector
            connector.maybe_connect = AutoConnector.maybe_connect.__get__(connector)
        dials: list[tuple[float, ID]] = []
        real_dial_peer = network.dial_peer

        async def counting_dial_peer(peer_id: ID) -> Any:
            dials.append((time.monotonic(), peer_id))
            return await real_dial_peer(peer_id)

        network.dial_peer = counting_dial_peer
        info = parse_peer_addr(full_addrs(node)[0])
        departed: set[ID] = set()
        for _ in range(clients):
            async with running_host(NodeIdentity.generate()) as client:
                with trio.fail_after(STEP_TIMEOUT_S):
                    await client.connect(info)
                    stream = await client.new_stream(info.peer_id, [ECHO])
                    await stream.write(b"hi")
                    await stream.read(64)
                await trio.sleep(0.2)
                departed.add(client.get_id())
        start = time.monotonic()
        await trio.sleep(window_s)
        in_window = [(t - start, p) for t, p in dials if t >= start]
    to_departed = [(t, p) for t, p in in_window if p in departed]
    return {
        "auto_connector": "py-libp2p default (before)" if before else "off (after)",
        "departed_clients": clients,
        "window_s": window_s,
        "dials_in_window": len(in_window),
        "dials_to_departed_clients": len(to_departed),
        "distinct_departed_clients_dialed": len({p for _, p in to_departed}),
        "dials_per_minute": round(len(in_window) * 60.0 / window_s, 2),
        "first_dial_after_s": round(in_window[0][0], 1) if in_window else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--window", type=float, default=DEFAULT_WINDOW_S)
    parser.add_argument("--only", choices=["before", "after"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    runs = {}
    for name in ("before", "after"):
        if args.only in (None, name):
            runs[name] = trio.run(measure, args.clients, args.window, name == "before")
            print(name, runs[name], flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "bench": "redial_storm",
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "command": "python bench/redial_storm.py "
                f"--clients {args.clients} --window {args.window:g}",
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
