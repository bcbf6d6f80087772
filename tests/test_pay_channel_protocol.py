"""`/meshnode/channel/1` messages: exact key sets and typed fields, or a typed error."""

from __future__ import annotations

from typing import Any

import pytest

from meshnode.pay.channel.protocol import (
    Announce,
    Announced,
    ChannelProtocolError,
    CloseRequest,
    CloseSigned,
    Refusal,
    parse_reply,
    parse_request,
)

ANNOUNCE = Announce(
    channel_id=5,
    key_a=bytes(32),
    address_a="0:" + "ab" * 32,
    quarantine_duration=3600,
    misbehavior_fine=1,
    conditional_close_duration=60,
    excess_fee=0,
)


def test_requests_round_trip() -> None:
    close = CloseRequest(channel_id=5, key_a=bytes(32), voucher=b"boc", signature_a=bytes(64))
    assert parse_request(ANNOUNCE.to_wire()) == ANNOUNCE
    assert parse_request(close.to_wire()) == close


def test_replies_round_trip_and_a_refusal_is_recognised() -> None:
    assert parse_reply(Announced(7, b"s").to_wire(), Announced) == Announced(7, b"s")
    assert parse_reply(CloseSigned(bytes(64)).to_wire(), CloseSigned) == CloseSigned(bytes(64))
    refusal = Refusal("stale_voucher", "no")
    assert parse_reply(refusal.to_wire(), CloseSigned) == refusal


@pytest.mark.parametrize(
    "change",
    [
        {"extra": 1},
        {"channel_id": -1},
        {"channel_id": "5"},
        {"key_a": bytes(31)},
        {"quarantine": True},
        {"address_a": "x" * 200},
    ],
)
def test_a_malformed_announce_is_a_typed_error(change: dict[str, Any]) -> None:
    wire = ANNOUNCE.to_wire() | change
    with pytest.raises(ChannelProtocolError):
        parse_request(wire)


def test_an_unknown_request_is_a_typed_error() -> None:
    with pytest.raises(ChannelProtocolError, match="unknown"):
        parse_request({"t": "withdraw_everything"})


def test_a_short_signature_is_refused() -> None:
    close = CloseRequest(channel_id=5, key_a=bytes(32), voucher=b"boc", signature_a=bytes(64))
    wire = close.to_wire()
    wire["sig_a"] = bytes(10)
    with pytest.raises(ChannelProtocolError):
        parse_request(wire)
