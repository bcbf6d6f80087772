"""Writing results: a JSON file per experiment and PNG plots beside it."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def machine() -> dict[str, Any]:
    """Where the numbers came from (they depend on it)."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version(),
            # other work on the machine slows wall-clock numbers; CPU seconds are not
            "loadavg_1min": os.getloadavg()[0], "gpu": "none"}


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_strategies(results: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    """Bars of p50/p95/p99 time to finish and TTFT, and Jain's index, per strategy."""
    plt = _plt()
    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, metric, label in ((axes[0], "finish_s", "time to finish (s)"),
                              (axes[1], "ttft_s", "time to first token (s)")):
        width = 0.27
        for k, q in enumerate(("p50", "p95", "p99")):
            vals = [results[s][metric][q] or 0.0 for s in names]
            ax.bar([i + (k - 1) * width for i in range(len(names))], vals, width, label=q)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yscale("log")
        ax.set_title(label)
        ax.legend()
    axes[2].bar(names, [results[s]["jain_utilisation"] for s in names], color="tab:green")
    axes[2].set_ylim(0, 1)
    axes[2].set_title("Jain's fairness of provider utilisation")
    axes[2].tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_load_sweep(sweep: dict[str, dict[str, dict[str, Any]]], title: str, path: Path) -> None:
    """p99 time to finish against offered load, one line per strategy."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    loads = sorted(sweep, key=float)
    strategies = list(sweep[loads[0]])
    for s in strategies:
        ax.plot([float(x) for x in loads], [sweep[x][s]["finish_s"]["p99"] or float("nan")
                                            for x in loads], marker="o", label=s)
    ax.set_xlabel("offered load (share of capacity)")
    ax.set_ylabel("p99 time to finish (s)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_validation(rows: list[dict[str, Any]], path: Path) -> None:
    """Simulated against measured p50/p95 time to finish."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    labels = [r["metric"] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["real"] for r in rows], 0.4, label="real (netns)")
    ax.bar([x + 0.2 for x in xs], [r["sim"] for r in rows], 0.4, label="simulated")
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    ax.set_ylabel("seconds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
