"""Long fuzz run: N inputs per decoder target, summary in bench/results/fuzz.json.

    python bench/fuzz.py                       # 10^6 inputs per target (hours on 2 cores)
    python bench/fuzz.py --inputs 20000        # what a quick check uses
    python bench/fuzz.py --targets adverts,vouchers --inputs 100000

The targets and the rule (a decoder returns a value or raises its typed error, within
MAX_INPUT_S per input) live in tests/fuzz_targets.py, shared with the short hypothesis
run in `make test`. Inputs come from a seeded mutational loop: a third raw random bytes,
a third byte-level mutants of valid encodings, a third structured mutants (a field
replaced, dropped or added, frames reordered, adverts re-signed). The run is
deterministic for a given --seed. Each distinct finding (its signature: exception type,
file and function that raised) is kept once, with its first reproducer in hex, and
marked known when tests/fuzz_targets.py KNOWN_BUGS already pins it. Exit status 1 means
a new finding.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fuzz_targets import (  # noqa: E402
    NEEDS_FIXTURES,
    TARGETS,
    Finding,
    Target,
    check,
    fixtures_present,
    generate,
    known_signatures,
)

DEFAULT_INPUTS = 1_000_000  # the bar: 10^6 inputs per target
# Findings kept per target: past a handful, the same bug is reported again under new lines.
MAX_FINDINGS_PER_TARGET = 20
REPRO_HEX_BYTES = 512  # enough to rebuild the small inputs that find bugs


def run_target(target: Target, n: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed ^ zlib.crc32(target.name.encode()))
    seeds = target.seeds()
    findings: dict[str, dict[str, Any]] = {}
    crashes = 0
    slowest = 0.0
    start = time.perf_counter()
    for i in range(n):
        data = generate(target, seeds, rng)
        t0 = time.perf_counter()
        try:
            check(target, data)
        except Finding as exc:
            crashes += 1
            key = exc.signature
            if key not in findings and len(findings) < MAX_FINDINGS_PER_TARGET:
                cause = exc.__cause__
                findings[key] = {
                    "first_input_index": i,
                    "input_len": len(data),
                    "input_hex": data[:REPRO_HEX_BYTES].hex(),
                    "error": str(exc)[:300],
                    "cause": f"{type(cause).__name__}: {str(cause)[:200]}" if cause else "",
                    "known": key in known_signatures(target.name),
                    "count": 0,
                }
            if key in findings:
                findings[key]["count"] += 1
        slowest = max(slowest, time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return {
        "inputs": n,
        "seconds": round(elapsed, 2),
        "inputs_per_s": round(n / elapsed, 1) if elapsed else None,
        "slowest_input_s": round(slowest, 4),
        "failing_inputs": crashes,
        "distinct_findings": len(findings),
        "new_findings": sorted(k for k, f in findings.items() if not f["known"]),
        "findings": findings,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--inputs", type=int, default=DEFAULT_INPUTS, help="inputs per target")
    ap.add_argument("--targets", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz.json")
    args = ap.parse_args(argv)

    names = [n for n in args.targets.split(",") if n] or list(TARGETS)
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {sorted(TARGETS)}")
    results: dict[str, Any] = {}
    for name in names:
        if name in NEEDS_FIXTURES and not fixtures_present():
            results[name] = {"skipped": "no TDX fixtures at ../shared/fixtures/tdx"}
            continue
        res = run_target(TARGETS[name], args.inputs, args.seed)
        results[name] = res
        print(
            f"{name:20s} {res['inputs']:>9d} inputs {res['seconds']:>8.1f} s "
            f"{res['failing_inputs']:>6d} failing, {res['distinct_findings']} distinct: "
            f"{', '.join(res['findings']) or '-'}",
            flush=True,
        )
    summary = {
        "command": " ".join(["python bench/fuzz.py", *(sys.argv[1:] if argv is None else argv)]),
        "engine": "seeded mutational loop (tests/fuzz_targets.py)",
        "seed": args.seed,
        "inputs_per_target": args.inputs,
        "machine": f"{platform.machine()} {platform.processor() or ''} "
                   f"python {platform.python_version()}".strip(),
        "targets": results,
        "total_distinct_findings": sum(r.get("distinct_findings", 0) for r in results.values()),
        "total_new_findings": sum(len(r.get("new_findings", ())) for r in results.values()),
        "known_bugs": "tests/fuzz_targets.py KNOWN_BUGS (pinned by tests/test_fuzz_known_bugs.py)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 1 if summary["total_new_findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
