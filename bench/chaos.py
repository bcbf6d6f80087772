"""Chaos run: 50 priced jobs on a loopback testnet while providers are SIGKILLed (and
restarted on the same ledger), SIGSTOPped (and resumed after the stall bound) or cut
off mid-stream. Writes bench/results/chaos.json.

    python bench/chaos.py                           # 50 jobs, kill + cut + stop
    python bench/chaos.py --jobs 20 --faults kill,cut

The testnet and the checks are tests/chaos_net.py, shared with tests/test_chaos.py (CI:
15 jobs, all three faults). The stall bound is the job client's own
(core.job_protocol.StallDetector: 5 s mid-stream for a fast provider). Exit status 1 when
a job ended with an untyped error, a gap or an error came later than the stall bound plus
RECOVERY_ALLOWANCE_S, or a channel's billing check failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from chaos_net import (  # noqa: E402
    FAULTS,
    RECOVERY_ALLOWANCE_S,
    ChaosConfig,
    ChaosReport,
    run_chaos,
)

from meshnode.engine.tinymodel import write_tiny_llama  # noqa: E402
from meshnode.pay.contract.code import load_payment_channel_code  # noqa: E402

TINY_CTX = 512  # the tiny model's context, as the provider processes load it


async def _main(cfg: ChaosConfig, tmp: Path) -> ChaosReport:
    from meshnode.engine.llama import LlamaEngine, steady_logit_bias

    gguf = write_tiny_llama(tmp / "tiny-llama.gguf", seed=0)
    async with await LlamaEngine.load(gguf, n_ctx=TINY_CTX) as engine:
        params = {"temperature": 0.0, "seed": 7, "logit_bias": steady_logit_bias(engine)}
    return await run_chaos(cfg, tmp, load_payment_channel_code(), gguf, params)


def _verdicts(report: ChaosReport) -> list[str]:
    bad = [f"job {j.index}: untyped {j.error}" for j in report.jobs if not j.typed]
    bad += [f"job {j.index}: {'gap' if j.ok else 'error'} {j.max_over_bound_s:.1f} s past the "
            f"stall bound (max gap {j.max_gap_s:.1f} s)" for j in report.jobs
            if j.max_over_bound_s > RECOVERY_ALLOWANCE_S]
    bad += [f"channel {b['channel']}: {b['problems']}" for b in report.billing if not b["ok"]]
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--providers", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=240)
    ap.add_argument("--fault-interval", type=float, default=1.0, help="mean seconds between faults")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"subset of {FAULTS}")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chaos.json")
    args = ap.parse_args(argv)
    cfg = ChaosConfig(
        jobs=args.jobs,
        providers=args.providers,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        fault_interval_s=args.fault_interval,
        faults=tuple(f for f in args.faults.split(",") if f),
        seed=args.seed,
        progress=True,
    )
    with tempfile.TemporaryDirectory(prefix="meshnode-chaos-") as tmp:
        report = trio.run(_main, cfg, Path(tmp))
    problems = _verdicts(report)
    summary: dict[str, Any] = {
        "command": " ".join(["python bench/chaos.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{platform.machine()} python {platform.python_version()}",
        "config": dataclasses.asdict(cfg),
        "summary": report.summary(),
        "problems": problems,
        "faults": [dataclasses.asdict(f) for f in report.faults],
        "jobs": [
            {k: v for k, v in dataclasses.asdict(j).items() if k != "prompt"} for j in report.jobs
        ],
        "billing": report.billing,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary["summary"], indent=2))
    for line in problems:
        print("PROBLEM", line)
    print(f"wrote {args.out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
