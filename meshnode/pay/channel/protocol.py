"""Messages of `/meshnode/channel/1`: a client tells a provider about a channel, or asks
it to co-sign a cooperative close. One request and one reply per stream.

Frames are the job protocol's (varint length + msgpack map); every map is checked for
its exact key set and field types here, before anything acts on it. Pure computation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing
from pytoniq_core.boc.cell import Cell

from meshnode.core.text import shown, shown_keys
from meshnode.core.voucher import MAX_VOUCHER_BOC_BYTES, PUBLIC_KEY_BYTES, SIGNATURE_BYTES
from meshnode.core.wire import WireError

CHANNEL_PROTOCOL = "/meshnode/channel/1"

UINT64_MAX = (1 << 64) - 1
"""msgpack integers stop at 64 bits, so channel ids and amounts on this wire do too."""
MAX_ADDRESS_CHARS = 80
"""A raw address is "wc:64 hex" (67 chars); user-friendly forms are 48."""
MAX_ERROR_CHARS = 512
"""Errors are for humans and logs."""
MAX_CODE_CHARS = 64


class ChannelProtocolError(WireError):
    code = "channel_schema"


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ChannelProtocolError(msg)


def _int(d: dict[str, Any], key: str) -> int:
    v = d[key]
    _require(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= UINT64_MAX,
        f"{key} must be a uint64",
    )
    return int(v)


def _bytes(d: dict[str, Any], key: str, *, exact: int = 0, limit: int = 0) -> bytes:
    v = d[key]
    _require(isinstance(v, bytes), f"{key} must be bytes")
    _require(not exact or len(v) == exact, f"{key} must be {exact} bytes")
    _require(not limit or len(v) <= limit, f"{key} longer than {limit} bytes")
    return bytes(v)


def _str(d: dict[str, Any], key: str, limit: int) -> str:
    v = d[key]
    _require(isinstance(v, str) and len(v) <= limit, f"{key} must be a string of <= {limit}")
    return str(v)


def _keys(d: dict[str, Any], kind: str, keys: set[str]) -> None:
    _require(d.get("t") == kind, f"expected {kind}")
    if set(d) != keys | {"t"}:
        # The peer's keys may be many, long, or of mixed types (unsortable): shown bounded.
        raise ChannelProtocolError(f"{kind}: keys {shown_keys(list(d))} != "
                                   f"{sorted(keys | {'t'})}")


@dataclass(frozen=True, slots=True)
class Announce:
    """Client → provider: the config of a channel the client opened to it."""

    channel_id: int
    key_a: bytes
    address_a: str
    quarantine_duration: int
    misbehavior_fine: int
    conditional_close_duration: int
    excess_fee: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "announce",
            "channel_id": self.channel_id,
            "key_a": self.key_a,
            "address_a": self.address_a,
            "quarantine": self.quarantine_duration,
            "fine": self.misbehavior_fine,
            "conditional": self.conditional_close_duration,
            "excess_fee": self.excess_fee,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Announce:
        keys = {"channel_id", "key_a", "address_a", "quarantine", "fine", "conditional"}
        _keys(d, "announce", keys | {"excess_fee"})
        return cls(
            channel_id=_int(d, "channel_id"),
            key_a=_bytes(d, "key_a", exact=PUBLIC_KEY_BYTES),
            address_a=_str(d, "address_a", MAX_ADDRESS_CHARS),
            quarantine_duration=_int(d, "quarantine"),
            misbehavior_fine=_int(d, "fine"),
            conditional_close_duration=_int(d, "conditional"),
            excess_fee=_int(d, "excess_fee"),
        )


@dataclass(frozen=True, slots=True)
class Announced:
    """Provider → client: the channel is known; B's signed zero state for closing."""

    deposit: int
    state_b: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": "announced", "deposit": self.deposit, "state_b": self.state_b}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Announced:
        _keys(d, "announced", {"deposit", "state_b"})
        return cls(
            deposit=_int(d, "deposit"),
            state_b=_bytes(d, "state_b", limit=MAX_VOUCHER_BOC_BYTES),
        )


@dataclass(frozen=True, slots=True)
class CloseRequest:
    """Client → provider: close paying exactly ``voucher``; A's signature on the split."""

    channel_id: int
    key_a: bytes
    """With the id, names the channel (ids are chosen by clients and may repeat)."""
    voucher: bytes
    signature_a: bytes

    def to_wire(self) -> dict[str, Any]:
        return {
            "t": "close",
            "channel_id": self.channel_id,
            "key_a": self.key_a,
            "voucher": self.voucher,
            "sig_a": self.signature_a,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> CloseRequest:
        _keys(d, "close", {"channel_id", "key_a", "voucher", "sig_a"})
        return cls(
            channel_id=_int(d, "channel_id"),
            key_a=_bytes(d, "key_a", exact=PUBLIC_KEY_BYTES),
            voucher=_bytes(d, "voucher", limit=MAX_VOUCHER_BOC_BYTES),
            signature_a=_bytes(d, "sig_a", exact=SIGNATURE_BYTES),
        )


@dataclass(frozen=True, slots=True)
class CloseSigned:
    """Provider → client: B's signature on the same cooperative close."""

    signature_b: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": "close_signed", "sig_b": self.signature_b}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> CloseSigned:
        _keys(d, "close_signed", {"sig_b"})
        return cls(signature_b=_bytes(d, "sig_b", exact=SIGNATURE_BYTES))


@dataclass(frozen=True, slots=True)
class Refusal:
    """Either reply slot: the request was refused; ``code`` is stable."""

    code: str
    msg: str

    def to_wire(self) -> dict[str, Any]:
        return {"t": "refused", "code": self.code, "msg": self.msg[:MAX_ERROR_CHARS]}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Refusal:
        _keys(d, "refused", {"code", "msg"})
        return cls(code=_str(d, "code", MAX_CODE_CHARS), msg=_str(d, "msg", MAX_ERROR_CHARS))


Request = Announce | CloseRequest


def parse_request(d: dict[str, Any]) -> Request:
    kind = d.get("t")
    if kind == "announce":
        return Announce.from_wire(d)
    if kind == "close":
        return CloseRequest.from_wire(d)
    raise ChannelProtocolError(f"unknown channel request {shown(kind)}")


def parse_reply(d: dict[str, Any], expected: type[Announced] | type[CloseSigned]) -> Any:
    """The expected reply, or a Refusal; anything else is a protocol error."""
    if d.get("t") == "refused":
        return Refusal.from_wire(d)
    return expected.from_wire(d)


def signed_by(public_key: bytes, cell: Cell, signature: bytes) -> bool:
    """Whether ``signature`` is ``public_key``'s Ed25519 signature of the cell's hash."""
    try:
        nacl.signing.VerifyKey(public_key).verify(bytes(cell.hash), signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True
