"""Numbers a researcher compares strategies by, computed from a simulation ``Outcome``
(or from the per-job records of a real run)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from meshnode.lab.sim import Outcome

PERCENTILES = (50, 95, 99)
NANOTON_PER_TON = 1e9


def jain_index(x: npt.NDArray[np.float64]) -> float:
    """Jain's fairness index (Σx)² / (n Σx²): 1 when all equal, 1/n when one takes all.
    Empty or all-zero input gives 1 (nothing is unfair about no work)."""
    if len(x) == 0 or not np.any(x):
        return 1.0
    return float(np.sum(x) ** 2 / (len(x) * np.sum(x * x)))


def percentiles(values: npt.NDArray[np.float64]) -> dict[str, float | None]:
    """p50/p95/p99 of the finite values (None when there are none)."""
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return {f"p{q}": None for q in PERCENTILES}
    return {f"p{q}": float(np.percentile(finite, q)) for q in PERCENTILES}


def summarize(out: Outcome) -> dict[str, Any]:
    """Metrics over the measured jobs (after the warm-up share)."""
    sl = slice(out.measured_from, None)
    finish, ttft = out.finish[sl], out.ttft[sl]
    n = len(finish)
    done = np.isfinite(finish)
    lo, hi = out.window
    span = max(1e-9, hi - lo)
    online = out.online_s > 0
    util = np.zeros(len(out.busy_s))
    util[online] = out.busy_s[online] / out.online_s[online]
    retried = int(np.sum(out.attempts[sl] > 1))
    return {
        "jobs_measured": n,
        "jobs_completed": int(done.sum()),
        "jobs_failed": int(n - done.sum()),
        "jobs_retried": retried,
        "failed_attempts": dict(out.failed_attempts),
        "ttft_s": percentiles(ttft),
        "finish_s": percentiles(finish),
        # waiting for a slot at the provider that served the job (its last attempt)
        "queue_wait_s": percentiles(out.queue_wait[sl][done]),
        "jobs_queued_share": float(np.mean(out.queue_wait[sl][done] > 0)) if done.any() else 0.0,
        "mean_finish_s": float(np.mean(finish[done])) if done.any() else None,
        "goodput_jobs_per_s": float(done.sum() / span),
        "goodput_tokens_per_s": float(out.tokens[sl][done].sum() / span),
        "utilisation_mean": float(util[online].mean()) if online.any() else 0.0,
        "utilisation_p99": float(np.percentile(util[online], 99)) if online.any() else 0.0,
        "providers_idle_share": float(np.mean(util[online] == 0)) if online.any() else 0.0,
        "jain_utilisation": jain_index(util[online]),
        "mean_cost_nanoton": float(out.cost[sl][done].mean()) if done.any() else None,
        "cost_ton_per_1m_tokens": (
            float(out.cost[sl][done].sum() / max(1, out.tokens[sl][done].sum()) * 1e6
                  / NANOTON_PER_TON)
            if done.any() else None
        ),
        "wall_s": out.wall_s,
        "cpu_s": out.cpu_s,
        "capacity_jobs_per_s": out.capacity_jobs_per_s,
        "counters": dict(out.counters),
    }
