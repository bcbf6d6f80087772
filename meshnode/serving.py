"""Open the engine a provider serves: a supervised runner, with a load progress bar.

Shared by `serve`, `testnet`, `demo` and `doctor` so every role loads models the same
way (model file checked first, llama.cpp in its own process, AMX-safe load plan).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from meshnode.engine.supervised import (
    RUNNER_STALL_TIMEOUT_S,
    RunnerConfig,
    SupervisedEngine,
    open_supervised_engine,
)


class LoadBar:
    """One progress bar per load stage (hashing, loading) on ``console``; nothing
    without a console, or when it is not a terminal (journald, `docker logs`, a pipe:
    rich would print nothing there but a blank line at the end). ``stop()`` removes the
    bars (idempotent)."""

    def __init__(self, console: Console | None, label: str) -> None:
        self._label = label
        self._tasks: dict[str, TaskID] = {}
        self._bar: Progress | None = None
        if console is not None and console.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._bar.start()

    def update(self, stage: str, fraction: float) -> None:
        if self._bar is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._bar.add_task(f"{stage} {self._label}", total=1.0)
        self._bar.update(self._tasks[stage], completed=fraction)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@asynccontextmanager
async def open_engine(
    path: Path,
    *,
    n_ctx: int,
    slots: int = 1,
    n_gpu_layers: int = 0,
    n_threads: int | None = None,
    stall_timeout_s: float = RUNNER_STALL_TIMEOUT_S,
    console: Console | None = None,
) -> AsyncIterator[SupervisedEngine]:
    """The model loaded in a supervised runner process, until the block exits."""
    config = RunnerConfig(model=Path(path), n_ctx=n_ctx, slots=slots, n_gpu_layers=n_gpu_layers,
                          n_threads=n_threads, stall_timeout_s=stall_timeout_s)
    bar = LoadBar(console, Path(path).name)
    try:
        async with open_supervised_engine(config, progress=bar.update) as engine:
            bar.stop()
            yield engine
    finally:
        bar.stop()


def default_gpu_layers() -> int:
    """Every layer on the GPU when llama.cpp was built with GPU offload (CUDA): what a GPU
    owner wants. None otherwise. Asks the library in this process; loads no model."""
    import llama_cpp

    return -1 if llama_cpp.llama_supports_gpu_offload() else 0
