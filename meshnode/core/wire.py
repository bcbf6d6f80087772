"""Framing for every meshnode stream: unsigned-varint length prefix + msgpack map.

Sans-io: `FrameDecoder.feed(bytes)` returns decoded maps; `encode_frame(map)` returns
bytes. Limits are checked before any allocation proportional to the peer's claim, so a
hostile length prefix costs us nothing.
"""

from __future__ import annotations

from typing import Any

import msgpack

from meshnode.core.text import shown

# A job's largest legitimate frame is a sealed prompt near the model's context (a few
# hundred KiB of text); 1 MiB leaves headroom without letting one frame pin much memory.
MAX_FRAME_BYTES = 1 << 20
# ceil(log128(MAX_FRAME_BYTES)) + 1: a longer varint can only encode an oversized length.
MAX_VARINT_BYTES = 4
# msgpack nesting deeper than this is never produced by our encoder; refuse it early.
MAX_NESTING = 8


class WireError(Exception):
    """A frame that cannot be accepted; the stream carrying it must be closed."""

    code = "wire"


class FrameTooLarge(WireError):
    code = "frame_too_large"


class MalformedFrame(WireError):
    code = "malformed_frame"


class TruncatedFrame(WireError):
    code = "truncated_frame"


def encode_uvarint(value: int) -> bytes:
    if value < 0:
        raise ValueError("uvarint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_frame(message: dict[str, Any]) -> bytes:
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return encode_uvarint(len(body)) + body


def _check_depth(obj: object, depth: int = 0) -> None:
    if depth > MAX_NESTING:
        raise MalformedFrame(f"nesting deeper than {MAX_NESTING}")
    if isinstance(obj, dict):
        for key, value in obj.items():
            # int keys carry token ids (logit_bias); nothing else is a sane map key.
            if not isinstance(key, str | int):
                raise MalformedFrame(f"map key of type {type(key).__name__} not allowed")
            _check_depth(value, depth + 1)
    elif isinstance(obj, list):
        for item in obj:
            _check_depth(item, depth + 1)


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=False,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError) as exc:
        raise MalformedFrame(f"not a msgpack value: {shown(str(exc))}") from exc
    except Exception as exc:  # msgpack raises assorted types on hostile input
        raise MalformedFrame(f"not a msgpack value: {type(exc).__name__}") from exc
    if not isinstance(obj, dict):
        raise MalformedFrame(f"frame must be a msgpack map, got {type(obj).__name__}")
    _check_depth(obj)
    return obj


class FrameDecoder:
    """Incremental decoder: bytes in, complete msgpack maps out."""

    def __init__(self, max_frame: int = MAX_FRAME_BYTES) -> None:
        self._buf = bytearray()
        self._max = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def _header(self) -> tuple[int, int] | None:
        """(body length, header length), or None when the varint is incomplete."""
        value = 0
        for i, byte in enumerate(self._buf[:MAX_VARINT_BYTES]):
            value |= (byte & 0x7F) << (7 * i)
            if not byte & 0x80:
                if value > self._max:
                    raise FrameTooLarge(f"peer announced {value} bytes, limit {self._max}")
                return value, i + 1
        if len(self._buf) >= MAX_VARINT_BYTES:
            raise FrameTooLarge(f"length prefix longer than {MAX_VARINT_BYTES} bytes")
        return None

    def needed(self) -> int:
        """How many more bytes complete the next frame (at least 1)."""
        header = self._header()
        if header is None:
            return 1
        length, hlen = header
        return max(1, hlen + length - len(self._buf))

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out: list[dict[str, Any]] = []
        while self._buf:
            header = self._header()
            if header is None:
                break
            length, hlen = header
            if len(self._buf) < hlen + length:
                break
            body = bytes(self._buf[hlen : hlen + length])
            del self._buf[: hlen + length]
            out.append(decode_body(body))
        return out

    def eof(self) -> None:
        """The peer closed its side; leftover bytes mean a frame was cut short."""
        if self._buf:
            raise TruncatedFrame(f"stream ended inside a frame ({len(self._buf)} bytes left)")
