"""Cells for the official TON payment-channel contract: initial data, address, op bodies.

The layouts follow the contract's TL-B (as tonweb's PaymentChannel writes them). Pure
computation; signing goes through VoucherSigner so one key type serves vouchers and
channel operations. Party A is the client (pays), party B is the provider.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytoniq_core.boc.address import Address
from pytoniq_core.boc.builder import Builder
from pytoniq_core.boc.cell import Cell

from meshnode.core.voucher import SIGNATURE_BYTES, Voucher, VoucherSigner

OP_TOP_UP_BALANCE = 0x67C7D281
OP_INIT_CHANNEL = 0x0E0620C2
OP_COOPERATIVE_CLOSE = 0x5577587E
OP_COOPERATIVE_COMMIT = 0x79A126EF
OP_START_UNCOOPERATIVE_CLOSE = 0x1F151ACF
OP_CHALLENGE_QUARANTINED_STATE = 0x088EAA32
OP_SETTLE_CONDITIONALS = 0x66F6F069
OP_FINISH_UNCOOPERATIVE_CLOSE = 0x25432A91
OP_CHANNEL_CLOSED = 0xDDDC88BA

TAG_INIT = 0x696E6974
TAG_COOPERATIVE_CLOSE = 0x436C6F73
TAG_START_UNCOOPERATIVE_CLOSE = 0x556E436C
TAG_CHALLENGE_STATE = 0x43686751

CHANNEL_STATE_UNINITED = 0
CHANNEL_STATE_OPEN = 1
CHANNEL_STATE_CLOSURE_STARTED = 2
CHANNEL_STATE_SETTLING_CONDITIONALS = 3
CHANNEL_STATE_AWAITING_FINALIZATION = 4
"""Values returned by the contract's ``get_channel_state`` get-method."""

FEE_RESERVE = 50_000_000
"""Nanoton sent with the deposit beyond the parties' balances: init_channel requires the
contract balance to exceed balances + excess_fee, and the surplus pays the gas of the
channel's own transactions (0.05 TON covers them several times on today's basechain)."""

WORKCHAIN = 0
"""Channels live in the basechain, like the wallets that fund them."""


@dataclass(frozen=True, slots=True)
class ClosingConfig:
    quarantine_duration: int
    """Seconds a unilaterally submitted state can be challenged."""
    misbehavior_fine: int
    """Nanoton moved from a party caught submitting a stale state."""
    conditional_close_duration: int
    """Seconds after quarantine for settling conditionals (we use none)."""


@dataclass(frozen=True, slots=True)
class ChannelConfig:
    """Everything that fixes a channel contract's initial data, hence its address."""

    channel_id: int
    key_a: bytes
    key_b: bytes
    address_a: Address
    address_b: Address
    closing: ClosingConfig
    excess_fee: int = 0


def channel_data(config: ChannelConfig) -> Cell:
    """The contract's initial persistent data (uninitialised, zero balances)."""
    closing = Builder()
    closing.store_uint(config.closing.quarantine_duration, 32)
    closing.store_coins(config.closing.misbehavior_fine)
    closing.store_uint(config.closing.conditional_close_duration, 32)
    payment = Builder()
    payment.store_coins(config.excess_fee)
    payment.store_address(config.address_a)
    payment.store_address(config.address_b)
    data = Builder()
    data.store_bit(0)  # inited
    data.store_coins(0)  # balance_A
    data.store_coins(0)  # balance_B
    data.store_bytes(config.key_a)
    data.store_bytes(config.key_b)
    data.store_uint(config.channel_id, 128)
    data.store_ref(closing.end_cell())
    data.store_uint(0, 32)  # committed_seqno_A
    data.store_uint(0, 32)  # committed_seqno_B
    data.store_bit(0)  # no quarantine
    data.store_ref(payment.end_cell())
    return data.end_cell()


def state_init(code: Cell, data: Cell) -> Cell:
    """StateInit with code and data only (split_depth, special, library all absent)."""
    builder = Builder()
    builder.store_uint(0b00110, 5)
    builder.store_ref(code)
    builder.store_ref(data)
    return builder.end_cell()


def channel_address(code: Cell, config: ChannelConfig) -> Address:
    return Address((WORKCHAIN, bytes(state_init(code, channel_data(config)).hash)))


def top_up_body(add_a: int, add_b: int) -> Cell:
    builder = Builder()
    builder.store_uint(OP_TOP_UP_BALANCE, 32)
    builder.store_coins(add_a)
    builder.store_coins(add_b)
    return builder.end_cell()


def _one_signature(op: int, is_a: bool, signer: VoucherSigner, signed: Cell) -> Cell:
    builder = Builder()
    builder.store_uint(op, 32)
    builder.store_bit(1 if is_a else 0)
    builder.store_bytes(signer.sign_hash(bytes(signed.hash)))
    builder.store_cell(signed)
    return builder.end_cell()


def init_channel_body(
    channel_id: int, balance_a: int, balance_b: int, *, is_a: bool, signer: VoucherSigner
) -> Cell:
    signed = Builder()
    signed.store_uint(TAG_INIT, 32)
    signed.store_uint(channel_id, 128)
    signed.store_coins(balance_a)
    signed.store_coins(balance_b)
    return _one_signature(OP_INIT_CHANNEL, is_a, signer, signed.end_cell())


@dataclass(frozen=True, slots=True)
class CooperativeClose:
    """The final split both parties sign; seqnos are the latest voucher seqnos."""

    channel_id: int
    balance_a: int
    balance_b: int
    seqno_a: int
    seqno_b: int

    @classmethod
    def settling(cls, voucher: Voucher, deposit_a: int, seqno_b: int = 1) -> CooperativeClose:
        """Close paying B exactly ``voucher.sent`` out of A's deposit.

        The contract requires both seqnos to exceed the committed ones (0 until a
        cooperative commit), so B, which never pays, uses 1.
        """
        if voucher.sent > deposit_a:
            raise ValueError(f"voucher sends {voucher.sent}, deposit is {deposit_a}")
        return cls(
            channel_id=voucher.channel_id,
            balance_a=deposit_a - voucher.sent,
            balance_b=voucher.sent,
            seqno_a=voucher.seqno,
            seqno_b=seqno_b,
        )

    def to_cell(self) -> Cell:
        builder = Builder()
        builder.store_uint(TAG_COOPERATIVE_CLOSE, 32)
        builder.store_uint(self.channel_id, 128)
        builder.store_coins(self.balance_a)
        builder.store_coins(self.balance_b)
        builder.store_uint(self.seqno_a, 64)
        builder.store_uint(self.seqno_b, 64)
        return builder.end_cell()

    def sign(self, signer: VoucherSigner) -> bytes:
        return signer.sign_hash(bytes(self.to_cell().hash))

    def body(self, signature_a: bytes, signature_b: bytes) -> Cell:
        if len(signature_a) != SIGNATURE_BYTES or len(signature_b) != SIGNATURE_BYTES:
            raise ValueError(f"signatures must be {SIGNATURE_BYTES} bytes")
        builder = Builder()
        builder.store_uint(OP_COOPERATIVE_CLOSE, 32)
        builder.store_ref(_signature_cell(signature_a))
        builder.store_ref(_signature_cell(signature_b))
        builder.store_cell(self.to_cell())
        return builder.end_cell()


def _signature_cell(signature: bytes) -> Cell:
    builder = Builder()
    builder.store_bytes(signature)
    return builder.end_cell()


def _states_body(
    op: int,
    tag: int,
    channel_id: int,
    state_a: Voucher,
    state_b: Voucher,
    *,
    is_a: bool,
    signer: VoucherSigner,
) -> Cell:
    signed = Builder()
    signed.store_uint(tag, 32)
    signed.store_uint(channel_id, 128)
    signed.store_ref(state_a.to_cell())
    signed.store_ref(state_b.to_cell())
    return _one_signature(op, is_a, signer, signed.end_cell())


def start_uncooperative_close_body(
    channel_id: int, state_a: Voucher, state_b: Voucher, *, is_a: bool, signer: VoucherSigner
) -> Cell:
    """Submit both parties' latest signed semi-channel states for quarantine."""
    return _states_body(
        OP_START_UNCOOPERATIVE_CLOSE,
        TAG_START_UNCOOPERATIVE_CLOSE,
        channel_id,
        state_a,
        state_b,
        is_a=is_a,
        signer=signer,
    )


def challenge_quarantined_state_body(
    channel_id: int, state_a: Voucher, state_b: Voucher, *, is_a: bool, signer: VoucherSigner
) -> Cell:
    """Replace a stale quarantined state with newer signed states (fines the submitter)."""
    return _states_body(
        OP_CHALLENGE_QUARANTINED_STATE,
        TAG_CHALLENGE_STATE,
        channel_id,
        state_a,
        state_b,
        is_a=is_a,
        signer=signer,
    )


def finish_uncooperative_close_body() -> Cell:
    builder = Builder()
    builder.store_uint(OP_FINISH_UNCOOPERATIVE_CLOSE, 32)
    return builder.end_cell()
