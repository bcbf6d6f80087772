"""Voucher sign / verify / parse speed (µs per operation), written to bench/results/.

Usage: python bench/voucher_speed.py [--iterations N]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

from meshnode.core.voucher import VoucherSigner, VoucherState, parse_voucher

DEFAULT_ITERATIONS = 2000
"""Enough for a stable median on a shared 2-core box in well under a second each."""

RESULTS = Path(__file__).resolve().parent / "results" / "voucher_speed.json"


def _median_us(op: Callable[[int], object], iterations: int) -> float:
    samples = []
    for i in range(iterations):
        start = time.perf_counter_ns()
        op(i)
        samples.append(time.perf_counter_ns() - start)
    samples.sort()
    return samples[len(samples) // 2] / 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    args = parser.parse_args()
    signer = VoucherSigner(bytes(range(32)))
    public_key = signer.public_key
    vouchers = [signer.sign(VoucherState(1 << 100, i + 1, 1_000 * (i + 1))) for i in range(64)]
    bocs = [v.to_boc() for v in vouchers]
    result = {
        "iterations": args.iterations,
        "sign_us": _median_us(
            lambda i: signer.sign(VoucherState(1 << 100, i + 1, 1_000 * (i + 1))), args.iterations
        ),
        "verify_us": _median_us(lambda i: vouchers[i % 64].verify(public_key), args.iterations),
        "parse_us": _median_us(lambda i: parse_voucher(bocs[i % 64]), args.iterations),
        "parse_and_verify_us": _median_us(
            lambda i: parse_voucher(bocs[i % 64]).verify(public_key), args.iterations
        ),
        "boc_bytes": len(bocs[0]),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
