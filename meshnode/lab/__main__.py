"""Command line of the routing lab: ``python -m meshnode.lab {sim,sweep,profile,real}``."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from meshnode.lab.metrics import summarize
from meshnode.lab.report import (
    RESULTS,
    machine,
    plot_load_sweep,
    plot_strategies,
    write_json,
)
from meshnode.lab.scenario import Scenario, ScenarioError, load_scenario
from meshnode.lab.sim import ALL_STRATEGIES, Simulation

BASELINE = "random"  # the strategy a client without a router would amount to


def run_one(sc: Scenario, strategy: str, seed: int | None = None) -> dict[str, Any]:
    sim = Simulation(sc, strategy, seed=seed)
    summary = summarize(sim.run(progress=lambda line: print(f"  [{strategy}] {line}",
                                                           flush=True)))
    print(f"  {strategy:13s} p50 {summary['finish_s']['p50']:8.2f} s  "
          f"p99 {summary['finish_s']['p99']:8.2f} s  failed {summary['jobs_failed']:6d}  "
          f"jain {summary['jain_utilisation']:.3f}  wall {summary['wall_s']:6.1f} s  "
          f"cpu {summary['cpu_s']:6.1f} s",
          flush=True)
    return summary


def compare(
    sc: Scenario,
    strategies: list[str],
    workers: int,
    on_result: Callable[[dict[str, dict[str, Any]]], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every strategy on the same mesh and jobs; ratios against the baseline.
    ``on_result`` sees the results so far after each strategy (to save partial work)."""
    results: dict[str, dict[str, Any]] = {}
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(run_one, sc, s): s for s in strategies}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if on_result is not None:
                    on_result(results)
        results = {s: results[s] for s in strategies}
    else:
        for s in strategies:
            results[s] = run_one(sc, s)
            if on_result is not None:
                on_result(results)
    base = results.get(BASELINE) or next(iter(results.values()))
    for r in results.values():
        for q in ("p50", "p99"):
            b, v = base["finish_s"][q], r["finish_s"][q]
            r[f"finish_{q}_vs_{BASELINE}"] = v / b if b and v is not None else None
    return results


def scenario_info(sc: Scenario) -> dict[str, Any]:
    return {
        "name": sc.name,
        "file": str(sc.path) if sc.path else None,
        "providers": sc.providers,
        "clients": sc.clients,
        "jobs": sc.jobs,
        "load": sc.load,
        "directory_max_entries": sc.directory_max_entries,
        "dial_timeout_s": sc.dial_timeout_s,
        "advert_lifetime_s": sc.advert_lifetime_s,
        "load_publish_interval_s": sc.load_publish_interval_s,
        "max_queue": sc.max_queue,
        "dial_delay_s": sc.dial_delay_s,
        "p2c_score_cutoff": sc.p2c_score_cutoff,
        "max_probe_share": sc.max_probe_share,
        "directory_rate_per_s": sc.directory_rate_per_s,
        "spread_probes": sc.spread_probes,
        "max_attempts": sc.max_attempts,
        "seed": sc.seed,
        "sources": sc.sources,
    }


def _overrides(sc: Scenario, args: argparse.Namespace) -> Scenario:
    changes: dict[str, Any] = {}
    for name in ("providers", "clients", "jobs", "load", "directory_max_entries", "seed",
                 "dial_timeout_s", "advert_lifetime_s", "load_publish_interval_s",
                 "max_queue", "dial_delay_s", "p2c_score_cutoff", "max_probe_share",
                 "directory_rate_per_s", "spread_probes", "max_attempts"):
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    return sc.with_overrides(**changes) if changes else sc


def _strategies(sc: Scenario, args: argparse.Namespace) -> list[str]:
    default = list(sc.strategies or ALL_STRATEGIES)
    chosen = args.strategies.split(",") if args.strategies else default
    bad = [s for s in chosen if s not in ALL_STRATEGIES]
    if bad:
        raise ScenarioError(f"unknown strategies {bad}; choose from {ALL_STRATEGIES}")
    return chosen


def cmd_sim(args: argparse.Namespace) -> None:
    sc = _overrides(load_scenario(args.scenario), args)
    strategies = _strategies(sc, args)
    print(f"{sc.name}: {sc.providers} providers, {sc.clients} clients, {sc.jobs} jobs, "
          f"load {sc.load}", flush=True)
    t0 = time.perf_counter()
    out = args.out or RESULTS / f"lab_{sc.name}.json"

    def save(results: dict[str, dict[str, Any]], *, partial: bool = True) -> None:
        write_json(out, {"scenario": scenario_info(sc), "machine": machine(),
                         "command": " ".join(["python -m meshnode.lab", *sys.argv[1:]]),
                         "partial": partial, "wall_s_total": time.perf_counter() - t0,
                         "results": results})

    results = compare(sc, strategies, args.workers, on_result=save)
    save(results, partial=False)
    plot_strategies(results, f"{sc.name}: {sc.providers} providers, load {sc.load}",
                    out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def cmd_sweep(args: argparse.Namespace) -> None:
    sc = _overrides(load_scenario(args.scenario), args)
    strategies = _strategies(sc, args)
    loads = [float(x) for x in args.loads.split(",")]
    sweep: dict[str, dict[str, dict[str, Any]]] = {}
    for load in loads:
        print(f"load {load}:", flush=True)
        sweep[str(load)] = compare(sc.with_overrides(load=load), strategies, args.workers)
    ratios = {}
    if "p2c" in strategies and "oracle" in strategies:
        ratios = {x: sweep[x]["p2c"]["finish_s"]["p99"] / sweep[x]["oracle"]["finish_s"]["p99"]
                  for x in sweep}
        for x, r in ratios.items():
            print(f"load {x}: p2c p99 / oracle p99 = {r:.3f}")
    out = args.out or RESULTS / f"lab_{sc.name}_sweep.json"
    write_json(out, {"scenario": scenario_info(sc), "machine": machine(), "loads": loads,
                     "p2c_p99_over_oracle_p99": ratios, "results": sweep})
    plot_load_sweep(sweep, f"{sc.name}: p99 time to finish", out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def cmd_profile(args: argparse.Namespace) -> None:
    sc = _overrides(load_scenario(args.scenario), args)
    strategy = args.strategies or "p2c"
    sim = Simulation(sc, strategy)
    prof = cProfile.Profile()
    prof.enable()
    out = sim.run()
    prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text).sort_stats("tottime")
    stats.print_stats(args.top)
    print(text.getvalue())
    print(f"{strategy}: {sc.jobs} jobs in {out.wall_s:.1f} s (profiled; slower than a plain run)")


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per strategy: the numbers a README or a paper table needs."""
    head = ("| strategy | finish p50 / p95 / p99 s | TTFT p50 / p95 / p99 s | failed | "
            "retried | attempts busy / unreachable / broken | Jain | TON per 1M tok | "
            "p99 vs random |")
    lines = [head, "|" + "---|" * 9]
    for name, r in results.items():
        f, t, fa = r["finish_s"], r["ttft_s"], r["failed_attempts"]
        ratio = r.get("finish_p99_vs_random")
        lines.append(
            f"| {name} | {f['p50']:.2f} / {f['p95']:.2f} / {f['p99']:.2f} | "
            f"{t['p50']:.2f} / {t['p95']:.2f} / {t['p99']:.2f} | {r['jobs_failed']} | "
            f"{r['jobs_retried']} | {fa['busy']} / {fa['unreachable']} / {fa['broken']} | "
            f"{r['jain_utilisation']:.3f} | {r['cost_ton_per_1m_tokens']:.3f} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} |"
        )
    return "\n".join(lines)


def cmd_table(args: argparse.Namespace) -> None:
    """Print a result file's strategy table as markdown (several files: merged)."""
    import json

    merged: dict[str, dict[str, Any]] = {}
    for path in [args.scenario, *args.more]:
        merged.update(json.loads(Path(path).read_text())["results"])
    base = merged.get(BASELINE)
    for r in merged.values():
        b, v = (base or r)["finish_s"]["p99"], r["finish_s"]["p99"]
        r["finish_p99_vs_random"] = v / b if b and v is not None else None
    print(markdown_table(merged))


def cmd_real(args: argparse.Namespace) -> None:
    from meshnode.lab.real import main_real

    main_real(args)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m meshnode.lab", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in (
        ("sim", cmd_sim, "compare strategies on one scenario"),
        ("sweep", cmd_sweep, "compare strategies at several loads"),
        ("profile", cmd_profile, "profile one simulation run"),
        ("real", cmd_real, "real nodes in network namespaces vs the simulator"),
    ):
        p = sub.add_parser(name, help=help_)
        p.set_defaults(fn=fn)
        p.add_argument("scenario", type=Path)
        p.add_argument("--strategies", help=f"comma-separated, from {','.join(ALL_STRATEGIES)}")
        p.add_argument("--providers", type=int)
        p.add_argument("--clients", type=int)
        p.add_argument("--jobs", type=int)
        p.add_argument("--load", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--directory-max-entries", dest="directory_max_entries", type=int)
        p.add_argument("--dial-timeout-s", dest="dial_timeout_s", type=float,
                       help="what if: client dial timeout (node: p2p.host.DIAL_TIMEOUT_S)")
        p.add_argument("--advert-lifetime-s", dest="advert_lifetime_s", type=float,
                       help="what if: advert lifetime (node: node.ADVERT_LIFETIME_S)")
        p.add_argument("--load-publish-interval-s", dest="load_publish_interval_s", type=float,
                       help="what if: provider load-change debounce (node: 5 s; receivers "
                            "still rate-limit adverts to core.directory.RATE_PER_S)")
        p.add_argument("--dial-delay-s", dest="dial_delay_s", type=float,
                       help="what if: wait before each dial (py-libp2p: 0.25 s)")
        p.add_argument("--max-queue", dest="max_queue", type=int,
                       help="what if: jobs a provider queues beyond its slots (node: 4)")
        p.add_argument("--p2c-score-cutoff", dest="p2c_score_cutoff", type=float,
                       help="what if: p2c samples within this factor of the best score "
                            "(node: core.router.P2C_SCORE_CUTOFF)")
        p.add_argument("--max-probe-share", dest="max_probe_share", type=float,
                       help="what if: share of a client's jobs that may probe unmeasured "
                            "providers (node: core.router.MAX_PROBE_SHARE)")
        p.add_argument("--directory-rate-per-s", dest="directory_rate_per_s", type=float,
                       help="what if: adverts per second a directory accepts from one peer "
                            "(node: core.directory.RATE_PER_S)")
        p.add_argument("--spread-probes", dest="spread_probes", type=lambda v: bool(int(v)),
                       help="what if: 0 = probe the best-scored unexplored provider, as "
                            "before (node: 1, core.router.Router.spread_probes)")
        p.add_argument("--max-attempts", dest="max_attempts", type=int,
                       help="what if: providers one job is offered to (node: "
                            "jobs.routed.DEFAULT_MAX_ATTEMPTS)")
        p.add_argument("--workers", type=int, default=1, help="processes (one per strategy)")
        p.add_argument("--out", type=Path)
        if name == "sweep":
            p.add_argument("--loads", default="0.5,0.7,0.9")
        if name == "profile":
            p.add_argument("--top", type=int, default=25)
        if name == "real":
            p.add_argument("--keep-going", action="store_true",
                           help="skip the simulator comparison")
    tab = sub.add_parser("table", help="print result JSON files as one markdown table")
    tab.set_defaults(fn=cmd_table)
    tab.add_argument("scenario", type=Path, metavar="RESULT_JSON")
    tab.add_argument("more", type=Path, nargs="*")
    args = ap.parse_args(argv)
    try:
        args.fn(args)
    except ScenarioError as exc:
        print(f"scenario error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
