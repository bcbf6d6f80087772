"""Discovery latency on loopback: a client that knows only the bootstrap address.

For each mesh size (1 bootstrap + N providers, each serving its own made-up model):
- cold start: from starting the client's host to the first usable (verified-signature,
  unexpired) advert of a given model, via ``ClientDiscovery.find`` (directory empty, so
  a DHT lookup);
- DHT find-providers latency (provider records only) and full lookup latency
  (providers + their advert records), median and max over several models;
- gossip: time from a provider's publish to the client's directory holding it.

All nodes run in one process on 127.0.0.1, so numbers include CPU contention between
nodes (2 cores here) and no network delay. Writes bench/results/discovery_latency.json.

Usage: python bench/discovery_latency.py [--sizes 20 40] [--lookups 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from discovery_mesh import model_id, running_mesh

from meshnode.p2p.dht import find_provider_ids

RESULTS = Path(__file__).resolve().parent / "results" / "discovery_latency.json"
DEFAULT_SIZES = (20, 40)  # modest: every node shares the same 2 cores
DEFAULT_LOOKUPS = 8  # models looked up per size; each lookup is ~0.1 s on loopback
DEFAULT_SETTLE_S = 5.0  # a few gossip heartbeats and DHT announce rounds
GOSSIP_WAIT_S = 20.0  # a publish that takes longer than this to arrive counts as lost


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": round(statistics.median(samples) * 1000, 1),
        "max_ms": round(max(samples) * 1000, 1),
        "n": len(samples),
    }


async def _measure(n: int, lookups: int, settle_s: float) -> dict[str, Any]:
    models = [[model_id(f"bench-{n}-{i}")] for i in range(n)]
    started = time.perf_counter()
    async with running_mesh(models, republish_s=3600.0, load_interval_s=0.0) as mesh:
        mesh_up_s = time.perf_counter() - started
        # A client normally joins an established mesh, not one still booting: let the
        # providers' first DHT announcements and gossip publishes finish first.
        await trio.sleep(settle_s)
        t0 = time.perf_counter()
        client = await mesh.add_client()
        target = model_id(f"bench-{n}-{n // 2}")
        found = await client.find(target, timeout=30)
        cold_s = time.perf_counter() - t0
        cold_lookups = client.dht_lookups
        assert found, f"no provider found for {target}"
        assert client.dht is not None
        await client.dht_joined.wait()  # the routing table fills behind the snapshot
        find_providers, full_lookup = [], []
        for i in range(lookups):
            key = model_id(f"bench-{n}-{(i * 7) % n}")
            t = time.perf_counter()
            ids = await find_provider_ids(client.dht, key)
            find_providers.append(time.perf_counter() - t)
            assert len(ids) == 1
            t = time.perf_counter()
            await client.lookup(key)
            full_lookup.append(time.perf_counter() - t)
        gossip = []
        for p in mesh.providers[:lookups]:
            assert p.announcer is not None
            before = len(p.published)
            t = time.perf_counter()
            p.announcer.load_changed()
            want = None
            with trio.move_on_after(GOSSIP_WAIT_S):
                while True:
                    # Wait for the publish this load change caused, not an earlier one
                    # (the client may already hold that from the bootstrap snapshot).
                    if len(p.published) > before and want is None:
                        want = p.published[before]
                    listing = client.directory.get(p.peer_id, time.time())
                    if want is not None and listing is not None and listing.advert.seq >= want:
                        gossip.append(time.perf_counter() - t)
                        break
                    await trio.sleep(0.005)
    return {
        "providers": n,
        "mesh_start_s": round(mesh_up_s, 2),
        "client_start_to_first_advert_ms": round(cold_s * 1000, 1),
        "first_advert_via": "dht" if cold_lookups else "bootstrap snapshot",
        "dht_find_providers": _summary(find_providers),
        "dht_lookup_with_adverts": _summary(full_lookup),
        "gossip_publish_to_directory": _summary(gossip) if gossip else None,
        "gossip_delivered": f"{len(gossip)}/{min(lookups, n)}",
    }


async def _main(sizes: list[int], lookups: int, settle_s: float) -> list[dict[str, Any]]:
    return [await _measure(n, lookups, settle_s) for n in sizes]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--lookups", type=int, default=DEFAULT_LOOKUPS)
    parser.add_argument("--settle", type=float, default=DEFAULT_SETTLE_S,
                        help="seconds between mesh start and the client joining")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # py-libp2p logs every reset stream at shutdown
    runs = trio.run(_main, args.sizes, args.lookups, args.settle)
    out = {
        "runs": runs,
        "note": "one process, 127.0.0.1, all nodes share the CPU; no network delay",
        "settle_s": args.settle,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
