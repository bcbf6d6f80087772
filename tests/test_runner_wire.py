"""The node <-> runner codec: exact schemas and size limits, checked before buffering."""

from __future__ import annotations

import msgpack
import pytest

from meshnode.core import runner_wire as wire


def test_messages_round_trip_even_when_split_across_reads() -> None:
    frames = wire.encode({"t": "chunk", "id": 7, "text": "héllo", "n": 2}) + wire.encode(
        {"t": "end", "id": 7, "reason": "length", "prompt": 3, "completion": 2, "cached": 0}
    )
    decoder = wire.FrameDecoder()
    got = []
    for i in range(len(frames)):
        got += decoder.feed(frames[i : i + 1])
    assert [m["t"] for m in got] == ["chunk", "end"]
    assert got[0]["text"] == "héllo"
    assert decoder.buffered == 0


def test_an_oversized_length_prefix_is_refused_before_the_body_arrives() -> None:
    decoder = wire.FrameDecoder(max_frame=1024)
    with pytest.raises(wire.RunnerProtocolError, match="exceeds"):
        decoder.feed((1 << 30).to_bytes(4, "big"))


@pytest.mark.parametrize(
    "msg",
    [
        {"t": "chunk", "id": 1, "text": "x"},  # missing n
        {"t": "chunk", "id": 1, "text": "x", "n": 1, "extra": 0},
        {"t": "chunk", "id": "1", "text": "x", "n": 1},
        {"t": "chunk", "id": True, "text": "x", "n": 1},  # bool is not an int here
        {"t": "end", "id": 1, "reason": "exploded", "prompt": 1, "completion": 1, "cached": 0},
        {"t": "err", "id": 1, "kind": "whatever", "msg": ""},
        {"t": "launch_missiles"},
        ["not", "a", "map"],
    ],
)
def test_frames_that_break_the_schema_are_protocol_errors(msg: object) -> None:
    body = msgpack.packb(msg, use_bin_type=True)
    with pytest.raises(wire.RunnerProtocolError):
        wire.FrameDecoder().feed(len(body).to_bytes(4, "big") + body)


def test_garbage_is_a_protocol_error_not_a_crash() -> None:
    with pytest.raises(wire.RunnerProtocolError, match="not msgpack"):
        wire.FrameDecoder().feed(b"\x00\x00\x00\x02\xc1\xc1")


def test_long_error_text_is_clipped_and_says_so() -> None:
    clipped = wire.clip("x" * 10_000, 100)
    assert len(clipped) < 130 and clipped.endswith("[9900 more]")
