"""Long fuzz run: N inputs per target, summary in bench/results/fuzz.json.

    python bench/fuzz.py                       # 10^6 inputs per target (hours on 2 cores)
    python bench/fuzz.py --inputs 20000        # what a quick check uses
    python bench/fuzz.py --targets adverts,vouchers --inputs 100000
    python bench/fuzz.py --engine atheris      # coverage-guided (pip install atheris)

The targets and the rule (a decoder returns a value or raises its typed error, within
MAX_INPUT_S per input) live in tests/fuzz_targets.py, shared with the short hypothesis
run in `make test`. Inputs come from a seeded mutational loop: a third raw random bytes,
a third byte-level mutants of valid encodings, a third structured mutants (a field
replaced, dropped or added, frames reordered, adverts re-signed). The job_state_machine
target takes scripts (frames to ProviderJob and ClientJob, with the driver's calls in
between) and its mutants drop, duplicate, move, alter and re-seal frames (no raw random
bytes there: they are rarely a script). The run is deterministic for a given --seed.
With --engine atheris each target runs instead in its own process under libFuzzer
(coverage-guided, meshnode's modules instrumented, started from the same seeds);
libFuzzer stops a target at its first new finding.

Each distinct finding (its signature: exception type, file and function that raised) is
kept once, with its first reproducer in hex, and
marked known when tests/fuzz_targets.py KNOWN_BUGS already pins it. Exit status 1 means
a new finding.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

if __name__ == "__main__" and "--atheris-child" in sys.argv:
    # Instrument meshnode for coverage before anything imports it.
    import atheris

    with atheris.instrument_imports(include=["meshnode"]):
        import fuzz_targets  # noqa: F401

from fuzz_targets import (  # noqa: E402
    MAX_MUTANT_BYTES,
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
# libFuzzer's own per-input limit; the rule's MAX_INPUT_S (1 s) is checked inside.
ATHERIS_TIMEOUT_S = 10


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


def atheris_child(name: str, n: int, seed: int, workdir: Path) -> None:
    """Runs inside the child process: libFuzzer drives `check`; known bugs are skipped."""
    import atheris

    target = TARGETS[name]
    known = known_signatures(name)

    def one_input(data: bytes) -> None:
        try:
            check(target, data)
        except Finding as finding:
            if finding.signature not in known:
                print(f"FINDING {finding.signature}", flush=True)
                raise

    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(target.seeds()):
        (corpus / f"seed{i}").write_bytes(data)
    atheris.Setup(
        [sys.argv[0], f"-runs={n}", f"-seed={seed}", f"-max_len={MAX_MUTANT_BYTES * 4}",
         f"-timeout={ATHERIS_TIMEOUT_S}", f"-artifact_prefix={workdir}/",
         "-print_final_stats=1", str(corpus)],
        one_input,
    )
    atheris.Fuzz()


def run_atheris(name: str, n: int, seed: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--atheris-child", name, "--inputs", str(n),
             "--seed", str(seed), "--workdir", tmp],
            capture_output=True, text=True, check=False,
        )
        elapsed = time.perf_counter() - start
        out = done.stdout + done.stderr
        executed = re.findall(r"stat::number_of_executed_units: (\d+)", out)
        findings: dict[str, dict[str, Any]] = {}
        if done.returncode != 0:
            sig = re.findall(r"FINDING (\S+)", out)
            key = sig[-1] if sig else f"exit {done.returncode}"
            artifacts = sorted(Path(tmp).glob("crash-*")) + sorted(Path(tmp).glob("timeout-*"))
            data = artifacts[0].read_bytes() if artifacts else b""
            findings[key] = {
                "input_len": len(data),
                "input_hex": data[:REPRO_HEX_BYTES].hex(),
                "error": out[-1500:],
                "known": False,
                "count": 1,
            }
    runs = int(executed[-1]) if executed else 0
    return {
        "inputs": runs,
        "seconds": round(elapsed, 2),
        "inputs_per_s": round(runs / elapsed, 1) if elapsed else None,
        "failing_inputs": len(findings),
        "distinct_findings": len(findings),
        "new_findings": sorted(findings),
        "findings": findings,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--inputs", type=int, default=DEFAULT_INPUTS, help="inputs per target")
    ap.add_argument("--targets", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fuzz.json")
    ap.add_argument("--engine", choices=("mutate", "atheris"), default="mutate")
    ap.add_argument("--atheris-child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.atheris_child:
        assert args.workdir is not None
        atheris_child(args.atheris_child, args.inputs, args.seed, args.workdir)
        return 0

    names = [n for n in args.targets.split(",") if n] or list(TARGETS)
    unknown = sorted(set(names) - set(TARGETS))
    if unknown:
        ap.error(f"unknown targets {unknown}; known: {sorted(TARGETS)}")
    results: dict[str, Any] = {}
    for name in names:
        if name in NEEDS_FIXTURES and not fixtures_present():
            results[name] = {"skipped": "no TDX fixtures at ../shared/fixtures/tdx"}
            continue
        if args.engine == "atheris":
            res = run_atheris(name, args.inputs, args.seed)
        else:
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
        "engine": "seeded mutational loop (tests/fuzz_targets.py)" if args.engine == "mutate"
        else "atheris (libFuzzer, coverage-guided, meshnode instrumented)",
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
