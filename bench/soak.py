"""The load of bench/load.py, repeated for --minutes, watching the client's memory.

    .venv/bin/python bench/soak.py [--minutes 30] [--providers 3] [--requests 200]
                                   [--concurrency 200] [--out PATH]

Same setup as bench/load.py (N `meshnode serve` processes on the tiny model, one
`meshnode client` serving the API, all on loopback). Runs rounds of --requests requests
(--concurrency at once) back to back until --minutes have passed. After each round it
records the client's RSS and the round's outcomes. Memory growth is measured from the end
of the first round (caches, pools and allocator arenas are warm by then) to the end of
the last, and as a least-squares slope in MiB per hour over the rounds after the first.
Writes bench/results/soak.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import RESULTS, drive, local_mesh, machine, percentile, rss_mib, served_model


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per hour."""
    if len(points) < 2:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (m - mean_m) for t, m in points)
    return round(cov / var * 3600, 2)


async def soak(url: str, client_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    model = await served_model(url)
    start = time.monotonic()
    end = start + args.minutes * 60
    rounds: list[dict[str, Any]] = []
    outcomes: Counter[str] = Counter()
    ok_latency: list[float] = []
    peak = rss_mib(client_pid)
    while time.monotonic() < end or not rounds:
        result = await drive(url, model, requests=args.requests, concurrency=args.concurrency,
                             max_tokens=args.max_tokens, rss_pid=client_pid)
        outcomes.update(result.outcomes)
        ok_latency.extend(result.ok_latency_s)
        peak = max(peak, result.rss_peak_mib)
        rounds.append({"t_s": round(time.monotonic() - start, 1),
                       "rss_mib": round(result.rss_end_mib, 1),
                       "ok": result.outcomes["ok"], "busy": result.outcomes["busy"],
                       "errors": result.errors, "wall_s": round(result.wall_s, 2)})
    first, last = rounds[0], rounds[-1]
    return {
        "rounds": len(rounds),
        "duration_s": last["t_s"],
        "requests": len(rounds) * args.requests,
        "outcomes": dict(outcomes),
        "errors": sum(n for k, n in outcomes.items() if k not in ("ok", "busy")),
        "ok_p50_s": percentile(ok_latency, 50),
        "ok_p99_s": percentile(ok_latency, 99),
        "rss_after_first_round_mib": first["rss_mib"],
        "rss_end_mib": last["rss_mib"],
        "rss_peak_mib": round(peak, 1),
        "rss_growth_after_warmup_mib": round(last["rss_mib"] - first["rss_mib"], 1),
        "rss_slope_mib_per_hour": slope_per_hour([(r["t_s"], r["rss_mib"]) for r in rounds[1:]]),
        "each_round": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--providers", type=int, default=3)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--queue", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    with local_mesh(args.providers, args.slots, args.queue) as mesh:
        result = trio.run(soak, mesh.url, mesh.client_pid, args)
    report = {
        "bench": "soak",
        "machine": machine(),
        "setup": {"minutes": args.minutes, "providers": args.providers, "slots": args.slots,
                  "queue": args.queue, "requests_per_round": args.requests,
                  "concurrency": args.concurrency, "max_tokens": args.max_tokens},
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "each_round"}, indent=2))


if __name__ == "__main__":
    main()
