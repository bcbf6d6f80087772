"""Load the model a provider serves, with a progress bar: the one place `serve` and
`demo` construct their engine (so a change of engine touches one function)."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

native_log = logging.getLogger("llama_cpp.native")

# ggml_log_level of the llama.cpp this build pins: NONE, DEBUG, INFO, WARN, ERROR, CONT.
# (llama-cpp-python 0.3.36's own callback still maps the older enum, so it prints
# warnings such as "n_ctx_seq > n_ctx_train" as errors, even with verbose=False.)
_GGML_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING,
                4: logging.ERROR}
_callback: Any = None  # the ctypes callback must outlive the native library's use of it


def route_native_logs() -> None:
    """Send llama.cpp's native log lines to the `llama_cpp.native` logger (shown from
    -vv on) instead of straight to stderr."""
    global _callback
    if _callback is not None:
        return
    import llama_cpp

    last = [logging.DEBUG]

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def forward(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if level != 5:  # 5 continues the previous line at its level
            last[0] = _GGML_LEVELS.get(level, logging.DEBUG)
        if native_log.isEnabledFor(last[0]):
            native_log.log(last[0], "%s", text.decode("utf-8", "replace").rstrip())

    _callback = forward
    llama_cpp.llama_log_set(forward, ctypes.c_void_p(0))


async def load_engine(path: Path, n_ctx: int, n_gpu_layers: int, console: Console) -> Any:
    """A loaded `LlamaEngine` for `path`; progress goes to `console` (stderr)."""
    from meshnode.engine.llama import LlamaEngine

    route_native_logs()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, fraction: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{stage} {path.name}", total=1.0)
            bar.update(tasks[stage], completed=fraction)

        return await LlamaEngine.load(
            path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, progress=progress
        )
