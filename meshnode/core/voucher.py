"""Payment vouchers: the TON payment-channel contract's own signed semi-channel state.

A voucher is exactly what the official payment-channel contract verifies on chain
(``signed_schs#_ signature:bits512 state:SemiChannel``)::

    semichannel_state#43685374 channel_id:uint128
        data:(seqno:uint64 sent:Coins conditionals:(HashmapE 32 ConditionalPayment))
        counterparty_data:(Maybe ^SemiChannelBody)

The signature is Ed25519 over the representation hash of the state cell, which is what
the contract's ``check_signature(slice_hash(state), signature, key)`` recomputes. We only
ever produce and accept vouchers with empty conditionals and no counterparty data, so a
voucher is one cell with no references. Sans-io: pure computation, no clocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import nacl.exceptions
import nacl.signing
from pytoniq_core.boc.builder import Builder
from pytoniq_core.boc.cell import Cell
from pytoniq_core.boc.slice import Slice

from meshnode.core.text import shown

STATE_TAG = 0x43685374
"""``semichannel_state`` constructor tag ("ChSt") the contract checks."""

SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32
SEED_BYTES = 32

CHANNEL_ID_BITS = 128
SEQNO_BITS = 64
COINS_MAX = (1 << 120) - 1
"""``Coins`` is VarUInteger 16: at most 15 bytes of value."""

MAX_VOUCHER_BOC_BYTES = 256
"""One 870-bit cell serialises to ~130 bytes; anything much larger is not a voucher,
and the limit is checked before the BOC parser allocates anything."""


class VoucherError(ValueError):
    """Base class: a voucher that cannot be built, parsed or trusted."""


class VoucherTooLarge(VoucherError):
    """The serialised voucher exceeds MAX_VOUCHER_BOC_BYTES."""


class MalformedVoucher(VoucherError):
    """The bytes are not a canonical signed semi-channel state with empty extras."""


class BadSignature(VoucherError):
    """The signature does not verify under the expected public key."""


def _check_range(name: str, value: int, limit: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise VoucherError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or value > limit:
        raise VoucherError(f"{name}={value} outside 0..{limit}")


@dataclass(frozen=True, slots=True)
class VoucherState:
    """The unsigned semi-channel state of the paying party (the client, party A)."""

    channel_id: int
    seqno: int
    sent: int
    """Cumulative nanoton paid over the whole channel, not per job."""

    def __post_init__(self) -> None:
        _check_range("channel_id", self.channel_id, (1 << CHANNEL_ID_BITS) - 1)
        _check_range("seqno", self.seqno, (1 << SEQNO_BITS) - 1)
        _check_range("sent", self.sent, COINS_MAX)

    def store(self, builder: Builder) -> Builder:
        """Append the state's bits to ``builder`` (the contract reads them inline)."""
        builder.store_uint(STATE_TAG, 32)
        builder.store_uint(self.channel_id, CHANNEL_ID_BITS)
        builder.store_uint(self.seqno, SEQNO_BITS)
        builder.store_coins(self.sent)
        builder.store_bit(0)  # conditionals: empty HashmapE
        builder.store_bit(0)  # counterparty_data: nothing
        return builder

    def to_cell(self) -> Cell:
        return self.store(Builder()).end_cell()

    def signing_hash(self) -> bytes:
        """The 32 bytes the payer signs: the state cell's representation hash."""
        return bytes(self.to_cell().hash)


@dataclass(frozen=True, slots=True)
class Voucher:
    """A signed semi-channel state, byte-for-byte what the contract accepts."""

    state: VoucherState
    signature: bytes

    def __post_init__(self) -> None:
        if len(self.signature) != SIGNATURE_BYTES:
            raise VoucherError(f"signature must be {SIGNATURE_BYTES} bytes")

    @property
    def channel_id(self) -> int:
        return self.state.channel_id

    @property
    def seqno(self) -> int:
        return self.state.seqno

    @property
    def sent(self) -> int:
        return self.state.sent

    def to_cell(self) -> Cell:
        return self.state.store(Builder().store_bytes(self.signature)).end_cell()

    def to_boc(self) -> bytes:
        return cell_to_boc(self.to_cell())

    def is_signed_by(self, public_key: bytes) -> bool:
        try:
            self.verify(public_key)
        except BadSignature:
            return False
        return True

    def verify(self, public_key: bytes) -> None:
        """Raise BadSignature unless ``public_key`` signed this state."""
        if len(public_key) != PUBLIC_KEY_BYTES:
            raise VoucherError(f"public key must be {PUBLIC_KEY_BYTES} bytes")
        try:
            nacl.signing.VerifyKey(public_key).verify(
                self.state.signing_hash(), self.signature
            )
        except nacl.exceptions.BadSignatureError as exc:
            raise BadSignature("voucher signature does not verify") from exc


class VoucherSigner:
    """Holds a channel signing key (Ed25519 from a 32-byte seed) and signs states."""

    __slots__ = ("_key",)

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise VoucherError(f"signing seed must be {SEED_BYTES} bytes")
        self._key = nacl.signing.SigningKey(seed)

    @property
    def public_key(self) -> bytes:
        return bytes(self._key.verify_key)

    def sign_hash(self, digest: bytes) -> bytes:
        """Ed25519 signature over a cell hash (also used for contract messages)."""
        return bytes(self._key.sign(digest).signature)

    def sign(self, state: VoucherState) -> Voucher:
        return Voucher(state=state, signature=self.sign_hash(state.signing_hash()))


def cell_to_boc(cell: Cell) -> bytes:
    """Serialise one cell tree as a BOC (no index, no CRC: what wallets and tonweb emit)."""
    # pytoniq-core leaves to_boc unannotated.
    return bytes(cell.to_boc())  # type: ignore[no-untyped-call]


def sign_voucher(state: VoucherState, seed: bytes) -> Voucher:
    """One-shot signing; keep a VoucherSigner when signing many vouchers."""
    return VoucherSigner(seed).sign(state)


_SIGNED_VOUCHER_BITS = SIGNATURE_BYTES * 8 + 32 + CHANNEL_ID_BITS + SEQNO_BITS


def parse_voucher(data: bytes) -> Voucher:
    """Parse a voucher BOC, accepting only the canonical encoding we would produce.

    The signature is not checked here (the caller knows which key to expect); use
    Voucher.verify. Raises VoucherTooLarge or MalformedVoucher.
    """
    if len(data) > MAX_VOUCHER_BOC_BYTES:
        raise VoucherTooLarge(f"voucher is {len(data)} bytes, limit {MAX_VOUCHER_BOC_BYTES}")
    try:
        roots = Cell.from_boc(bytes(data))
    except Exception as exc:  # the BOC parser raises many unrelated types on bad input
        raise MalformedVoucher(f"not a valid BOC: {shown(str(exc))}") from exc
    if len(roots) != 1:
        raise MalformedVoucher(f"expected one root cell, got {len(roots)}")
    cell = roots[0]
    if cell.is_exotic:
        raise MalformedVoucher("exotic cell")
    if cell.refs:
        raise MalformedVoucher("conditionals and counterparty data must be empty")
    voucher = _read_voucher(Slice(cell.bits.copy(), list(cell.refs), cell.type_))
    if voucher.to_cell().hash != cell.hash:
        raise MalformedVoucher("non-canonical encoding")
    return voucher


def _read_voucher(cs: Slice) -> Voucher:
    try:
        if cs.remaining_bits < _SIGNED_VOUCHER_BITS:
            raise MalformedVoucher("voucher cell too short")
        signature = bytes(cs.load_bytes(SIGNATURE_BYTES))
        tag = cs.load_uint(32)
        if tag != STATE_TAG:
            raise MalformedVoucher(f"tag {tag:#010x} is not semichannel_state")
        channel_id = cs.load_uint(CHANNEL_ID_BITS)
        seqno = cs.load_uint(SEQNO_BITS)
        sent = cs.load_coins()
        has_conditionals = cs.load_bit()
        has_counterparty = cs.load_bit()
    except MalformedVoucher:
        raise
    except Exception as exc:
        raise MalformedVoucher(f"truncated voucher: {shown(str(exc))}") from exc
    if has_conditionals or has_counterparty:
        raise MalformedVoucher("conditionals and counterparty data must be empty")
    if cs.remaining_bits or cs.remaining_refs:
        raise MalformedVoucher("trailing data after the state")
    if sent is None:
        raise MalformedVoucher("missing sent amount")
    return Voucher(
        state=VoucherState(channel_id=channel_id, seqno=seqno, sent=sent),
        signature=signature,
    )
