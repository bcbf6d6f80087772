"""A GGUF header walker: the few facts we need from a model file, fast and bounds-checked.

gguf.GGUFReader turns every array element into Python objects (~20 s for Gemma's 262k
token vocabulary on a loaded 2-core machine). This walks the key/value section skipping
what it does not need, then the tensor table, and says where the tensor data ends (so a
truncated download is caught before llama.cpp maps it). Every offset is checked against
the buffer: a corrupt or hostile file raises GgufError, never reads out of bounds.

Pure: it takes any bytes-like buffer (an mmap of the file in practice) and the ggml type
size table from the caller.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

MAGIC = b"GGUF"
STRING = 8
ARRAY = 9
FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
# llama.cpp's default when a file has no general.alignment.
DEFAULT_ALIGNMENT = 32
# GGML_MAX_DIMS: a tensor has at most 4 dimensions.
MAX_DIMS = 4

Buffer = bytes | memoryview | mmap.mmap  # mmap only for its type: this module does no I/O
TypeSizes = Mapping[int, tuple[int, int]]
"""ggml type id -> (elements per block, bytes per block)."""


class GgufError(ValueError):
    """Not a GGUF file, or one that is cut short or inconsistent."""


@dataclass(frozen=True)
class GgufLayout:
    version: int
    n_tensors: int
    alignment: int
    data_start: int
    data_end: int  # offset one past the last tensor's data: the file must be this long
    strings: dict[str, str] = field(default_factory=dict)  # the wanted string values


class _Cursor:
    def __init__(self, buf: Buffer) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise GgufError("the header is cut short (truncated file?)")
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values

    def string(self) -> bytes:
        (n,) = self.take("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise GgufError("a header string runs past the end of the file (truncated?)")
        value = bytes(self.buf[self.pos : end])
        self.pos = end
        return value

    def skip(self, kind: int) -> None:
        if kind == STRING:
            (n,) = self.take("<Q")
            self.advance(n)
        elif kind == ARRAY:
            elem, count = self.take("<IQ")
            if elem in FIXED_SIZES:
                self.advance(count * FIXED_SIZES[elem])
            else:
                for _ in range(count):
                    self.skip(elem)
        elif kind in FIXED_SIZES:
            self.advance(FIXED_SIZES[kind])
        else:
            raise GgufError(f"unknown GGUF value type {kind}")

    def advance(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise GgufError("a header value runs past the end of the file (truncated?)")
        self.pos += n


def read_layout(buf: Buffer, type_sizes: TypeSizes,
                want: Collection[str] = ()) -> GgufLayout:
    if bytes(buf[:4]) != MAGIC:
        raise GgufError("not a GGUF file (it does not start with 'GGUF')")
    cur = _Cursor(buf)
    cur.advance(4)
    (version,) = cur.take("<I")
    n_tensors, n_kv = cur.take("<QQ")
    alignment = DEFAULT_ALIGNMENT
    strings: dict[str, str] = {}
    for _ in range(n_kv):
        name = cur.string().decode("utf-8", "replace")
        (kind,) = cur.take("<I")
        if name == "general.alignment" and kind == 4:
            (alignment,) = cur.take("<I")
            if alignment == 0 or alignment & (alignment - 1):
                raise GgufError(f"general.alignment {alignment} is not a power of two")
        elif name in want and kind == STRING:
            strings[name] = cur.string().decode("utf-8", "replace")
        else:
            cur.skip(kind)
    end = 0
    for _ in range(n_tensors):
        cur.string()
        (n_dims,) = cur.take("<I")
        if n_dims > MAX_DIMS:
            raise GgufError(f"a tensor has {n_dims} dimensions (at most {MAX_DIMS})")
        dims = cur.take(f"<{n_dims}Q")
        kind, offset = cur.take("<IQ")
        if kind not in type_sizes:
            raise GgufError(f"unknown tensor type {kind}")
        block, size = type_sizes[kind]
        elements = 1
        for d in dims:
            elements *= d
        end = max(end, offset + elements // block * size)
    data_start = -(-cur.pos // alignment) * alignment
    return GgufLayout(version=version, n_tensors=n_tensors, alignment=alignment,
                      data_start=data_start, data_end=data_start + end, strings=strings)
