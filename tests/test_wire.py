"""Frame codec: length prefix + msgpack map, limits checked before reading the body."""

import msgpack
import pytest

from meshnode.core.messages import (
    Open,
    SchemaError,
    UnknownMessage,
    VoucherMsg,
    parse_message,
)
from meshnode.core.wire import (
    MAX_FRAME_BYTES,
    FrameDecoder,
    FrameTooLarge,
    MalformedFrame,
    TruncatedFrame,
    encode_frame,
    encode_uvarint,
)

MODEL = "ab" * 32


def _open() -> Open:
    return Open(
        job_id=b"j" * 16,
        model_id=MODEL,
        params={"temperature": 0.0},
        max_tokens=8,
        channel_id=None,
        client_pub=b"k" * 32,
        header=b"h" * 24,
    )


def test_round_trip_split_at_every_byte() -> None:
    data = encode_frame(_open().to_wire()) + encode_frame(VoucherMsg(boc=b"x").to_wire())
    dec = FrameDecoder()
    out = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    assert [parse_message(m) for m in out] == [_open(), VoucherMsg(boc=b"x")]
    dec.eof()


def test_oversized_length_rejected_before_body_arrives() -> None:
    dec = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        dec.feed(encode_uvarint(MAX_FRAME_BYTES + 1))


def test_overlong_varint_rejected() -> None:
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(b"\x80\x80\x80\x80\x01")


def test_encoder_refuses_oversized_frame() -> None:
    with pytest.raises(FrameTooLarge):
        encode_frame({"t": "x", "b": b"\0" * MAX_FRAME_BYTES})


def test_truncated_frame_detected_at_eof() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(_open().to_wire())[:-3])
    with pytest.raises(TruncatedFrame):
        dec.eof()


def test_non_msgpack_body_is_malformed() -> None:
    with pytest.raises(MalformedFrame):
        FrameDecoder().feed(encode_uvarint(3) + b"\xc1\xc1\xc1")


def test_non_map_body_is_malformed() -> None:
    body = msgpack.packb([1, 2, 3])
    with pytest.raises(MalformedFrame):
        FrameDecoder().feed(encode_uvarint(len(body)) + body)


def test_deep_nesting_is_malformed() -> None:
    value: object = 1
    for _ in range(20):
        value = [value]
    body = msgpack.packb({"t": value})
    with pytest.raises(MalformedFrame):
        FrameDecoder().feed(encode_uvarint(len(body)) + body)


def test_unknown_type_rejected() -> None:
    with pytest.raises(UnknownMessage):
        parse_message({"t": "teleport"})


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": "AB" * 32},
        {"max_tokens": 0},
        {"max_tokens": True},
        {"job_id": b"short"},
        {"epk": "not-bytes"},
        {"channel_id": -1},
        {"v": 2},
        {"params": [1]},
    ],
)
def test_open_schema_violations(change: dict[str, object]) -> None:
    wire = _open().to_wire()
    wire.update(change)
    with pytest.raises(SchemaError):
        parse_message(wire)


def test_extra_or_missing_keys_rejected() -> None:
    wire = _open().to_wire()
    with pytest.raises(SchemaError):
        parse_message({**wire, "extra": 1})
    del wire["hdr"]
    with pytest.raises(SchemaError):
        parse_message(wire)
