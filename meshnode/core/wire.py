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
# Values in one frame. Our largest: a directory snapshot batch (at most 1,024 adverts as
# bytes) and an Open with 300 logit-bias entries (~650 values); 4x headroom. Checked on
# the bytes before decoding: 1 MiB of empty lists took 1 s of the event loop to build
# and walk, now it is refused after 4,096 type bytes.
MAX_FRAME_OBJECTS = 4096


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


# Bytes after a msgpack type byte that give a container's length or a payload's size, and
# the fixed payload that follows: type byte -> (length bytes, fixed extra bytes, kind).
# kind: "a" array of n items, "m" map of n pairs, "s" n payload bytes, "x" ext (1 + n).
_SIZED: dict[int, tuple[int, int, str]] = {
    0xC4: (1, 0, "s"), 0xC5: (2, 0, "s"), 0xC6: (4, 0, "s"),  # bin 8/16/32
    0xC7: (1, 1, "s"), 0xC8: (2, 1, "s"), 0xC9: (4, 1, "s"),  # ext 8/16/32 (+ type byte)
    0xD9: (1, 0, "s"), 0xDA: (2, 0, "s"), 0xDB: (4, 0, "s"),  # str 8/16/32
    0xDC: (2, 0, "a"), 0xDD: (4, 0, "a"), 0xDE: (2, 0, "m"), 0xDF: (4, 0, "m"),
}
_FIXED: dict[int, int] = {  # type byte -> payload bytes that follow it
    0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8,  # nil, false, true, float32/64
    0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8,  # (u)ints
    0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17,  # fixext 1/2/4/8/16 (+ type byte)
}


def check_shape(data: bytes, *, max_depth: int, max_objects: int, complete: bool = True
                ) -> None:
    """Refuse msgpack whose containers nest deeper than `max_depth` or which holds more
    than `max_objects` values, *before* msgpack builds any of them.

    Reads only type bytes and lengths, skipping string and binary payloads, and stops at
    the first value past a limit: the cost is O(min(objects, max_objects)) whatever the
    size of `data`. (A megabyte of empty lists is a million objects to build; here it is
    refused at the 65th list.) `data` must be exactly one value, unless `complete` is
    False: then it may be the head of one, and only what it holds is checked."""
    view = memoryview(data)
    pos, objects = 0, 0
    pending = [1]  # values still expected at each open nesting level
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        if pos >= len(view):
            break
        pending[-1] -= 1
        objects += 1
        if objects > max_objects:
            raise MalformedFrame(f"more than {max_objects} msgpack values")
        tb = view[pos]
        pos += 1
        count = 0
        if tb <= 0x7F or tb >= 0xE0:  # fixint
            continue
        if 0x80 <= tb <= 0x8F:
            count = 2 * (tb & 0x0F)
        elif 0x90 <= tb <= 0x9F:
            count = tb & 0x0F
        elif 0xA0 <= tb <= 0xBF:
            pos += tb & 0x1F
            continue
        elif tb in _FIXED:
            pos += _FIXED[tb]
            continue
        elif tb in _SIZED:
            width, extra, kind = _SIZED[tb]
            n = int.from_bytes(view[pos : pos + width], "big")
            pos += width
            if kind == "s":
                pos += extra + n
                continue
            count = 2 * n if kind == "m" else n
        else:
            raise MalformedFrame(f"msgpack type byte 0x{tb:02x} is never used")
        if count:
            if len(pending) > max_depth:
                raise MalformedFrame(f"msgpack nested deeper than {max_depth}")
            pending.append(count)
    if complete and (pos != len(view) or any(pending)):
        raise MalformedFrame("msgpack value truncated or followed by extra bytes")


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
    check_shape(body, max_depth=MAX_NESTING, max_objects=MAX_FRAME_OBJECTS)
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
