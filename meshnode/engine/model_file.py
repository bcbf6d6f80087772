"""Check a model file before a runner spends minutes (or crashes) loading it.

Catches, with an error that says what to do: a missing file, a file that is not GGUF,
a GGUF cut short (an interrupted download), and a model larger than the memory this
machine has free. Blocking (reads the header): call it from a worker thread.

Not checked: that llama.cpp supports the architecture, or that the weights are sane;
the runner's load reports those.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from meshnode.core.gguf_header import GgufError, read_layout

GGUF_MAGIC = b"GGUF"
# llama.cpp reads GGUF versions 2 and 3; version 1 files were converted away in 2023.
GGUF_VERSIONS = (2, 3)
# The KV cache, compute buffers and the runner process need memory beyond the weights;
# a model bigger than available memory minus this margin will swap or be OOM-killed.
MEMORY_MARGIN_BYTES = 256 * 1024 * 1024


class ModelFileError(ValueError):
    """The model file cannot be served; the message says why and what to do."""


def check_model_file(path: Path, check_memory: bool = True,
                     memory_available: int | None = None) -> None:
    """Raise ModelFileError if ``path`` cannot be served here. ``memory_available``
    (bytes) defaults to what /proc/meminfo says."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(
            f"{path} is not a GGUF model file (it does not start with 'GGUF'); "
            "meshnode serves llama.cpp GGUF files: convert or download a .gguf"
        )
    version = int.from_bytes(head[4:8], "little")
    if version not in GGUF_VERSIONS:
        raise ModelFileError(f"{path}: GGUF version {version} is not supported "
                             f"(llama.cpp reads {GGUF_VERSIONS})")
    needed = _tensor_data_end(path)
    if needed > size:
        raise ModelFileError(
            f"{path} is truncated: its tensors need {needed} bytes, the file has {size} "
            "(an interrupted download? fetch it again and compare its sha256)"
        )
    if check_memory:
        available = memory_available if memory_available is not None \
            else available_memory_bytes()
        if available is not None and size + MEMORY_MARGIN_BYTES > available:
            raise ModelFileError(
                f"{path} ({size / 2**30:.1f} GiB) does not fit in the memory available "
                f"({available / 2**30:.1f} GiB): choose a smaller quantization, free "
                "memory, or offload it to a GPU with --n-gpu-layers"
            )


def _tensor_data_end(path: Path) -> int:
    """Bytes the file must have: the end of its last tensor's data."""
    from gguf.constants import GGML_QUANT_SIZES

    sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return read_layout(buf, sizes).data_end
    except GgufError as exc:
        raise ModelFileError(f"{path}: {exc}") from None


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemAvailable from /proc/meminfo (plus free swap), or None where unknown."""
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    if "MemAvailable" not in values:
        return None
    return values["MemAvailable"] + values.get("SwapFree", 0)
