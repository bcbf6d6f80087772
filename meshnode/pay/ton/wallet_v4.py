"""The standard TON wallet (v4r2) a node pays from on the real network: pure cell building.

A node's wallet key (``PaymentKeys.wallet_seed``) controls a wallet-v4r2 contract whose
address follows from its StateInit (the public contract code plus seqno 0, the subwallet
id and the public key). Every payment-channel operation is one signed external message
to that wallet asking it to send one internal message. Nothing here talks to a network;
``meshnode.pay.ton.lite_chain`` sends what this module builds.

The code cell comes from pytoniq (which ships the published wallet code); its hash is
pinned below so a changed or corrupted copy fails loudly instead of yielding a
different address that nobody funded.
"""

from __future__ import annotations

from pytoniq.contract.wallets.wallet import WALLET_V4_R2_CODE
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.builder import Builder
from pytoniq_core.boc.cell import Cell

from meshnode.core.voucher import VoucherSigner
from meshnode.pay.contract.cells import state_init

WALLET_V4R2_CODE_HASH = bytes.fromhex(
    "feb5ff6820e2ff0d9483e7e0d62c817d846789fb4ae580c878866d959dabd5c0"
)
"""The published wallet-v4r2 code hash (what explorers show for every v4r2 wallet)."""

SUBWALLET_ID = 698983191
"""The default subwallet id of basechain v4 wallets (TON wallets and pytoniq agree), so
the address matches what a user's wallet app shows for the same key."""

SEND_MODE_PAY_FEES_SEPARATELY = 1
SEND_MODE_IGNORE_ERRORS = 2
TRANSFER_SEND_MODE = SEND_MODE_PAY_FEES_SEPARATELY | SEND_MODE_IGNORE_ERRORS
"""Mode 3, as wallet apps use: the value arrives whole and a failed send still bumps the
seqno (so a bad message cannot be replayed forever); the sender checks what went out."""

OP_SIMPLE_SEND = 0
"""v4 wallets' op byte for "send these messages" (others manage plugins)."""

MAX_UINT32 = 2**32 - 1


class WalletMessageError(ValueError):
    """A wallet transfer cannot be built from these arguments."""


def wallet_code() -> Cell:
    if bytes(WALLET_V4_R2_CODE.hash) != WALLET_V4R2_CODE_HASH:
        raise WalletMessageError("pytoniq's wallet-v4r2 code is not the published code")
    return WALLET_V4_R2_CODE


def wallet_data(public_key: bytes, subwallet_id: int = SUBWALLET_ID, seqno: int = 0) -> Cell:
    """v4 storage: seqno, subwallet id, public key, empty plugin dictionary."""
    if len(public_key) != 32:
        raise WalletMessageError("a wallet public key is 32 bytes")
    builder = Builder()
    builder.store_uint(seqno, 32)
    builder.store_uint(subwallet_id, 32)
    builder.store_bytes(public_key)
    builder.store_bit(0)  # no plugins
    return builder.end_cell()


def wallet_state_init(public_key: bytes, subwallet_id: int = SUBWALLET_ID) -> Cell:
    """The StateInit that deploys this key's wallet (and so names its address)."""
    return state_init(wallet_code(), wallet_data(public_key, subwallet_id))


def wallet_v4_address(
    wallet_public_key: bytes, workchain: int = 0, subwallet_id: int = SUBWALLET_ID
) -> Address:
    """The real wallet-v4r2 address of a key: ``workchain:`` + its StateInit hash."""
    return Address((workchain, bytes(wallet_state_init(wallet_public_key, subwallet_id).hash)))


def wallet_internal_message(
    destination: Address, value: int, body: Cell, state_init_cell: Cell | None
) -> Cell:
    """The internal message the wallet is asked to send (MessageRelaxed, TL-B)."""
    if value < 0:
        raise WalletMessageError("a message value cannot be negative")
    builder = Builder()
    builder.store_uint(0, 1)  # int_msg_info$0
    builder.store_bit(1)  # ihr_disabled
    builder.store_bit(1)  # bounce: a failing contract returns the value
    builder.store_bit(0)  # bounced
    builder.store_uint(0, 2)  # src addr_none: the chain fills in the wallet
    builder.store_address(destination)
    builder.store_coins(value)
    builder.store_bit(0)  # no extra currencies
    builder.store_coins(0)  # ihr_fee
    builder.store_coins(0)  # fwd_fee
    builder.store_uint(0, 64)  # created_lt
    builder.store_uint(0, 32)  # created_at
    if state_init_cell is None:
        builder.store_bit(0)
    else:
        builder.store_bit(1)  # Maybe: present
        builder.store_bit(1)  # Either: in a ref, so any size fits
        builder.store_ref(state_init_cell)
    builder.store_bit(1)  # body in a ref
    builder.store_ref(body)
    return builder.end_cell()


def build_wallet_transfer(
    wallet_seed: bytes,
    seqno: int,
    valid_until: int,
    destination: Address,
    value: int,
    body: Cell,
    state_init_cell: Cell | None = None,
    subwallet_id: int = SUBWALLET_ID,
) -> Cell:
    """The signed body of a wallet external message that sends one internal message.

    Layout: signature, then the signed cell: subwallet id, valid_until, seqno, op 0,
    send mode and the message in a ref. The wallet checks the signature over the hash
    of everything after the signature."""
    fields = {"seqno": seqno, "valid_until": valid_until, "subwallet id": subwallet_id}
    for name, number in fields.items():
        if not 0 <= number <= MAX_UINT32:
            raise WalletMessageError(f"{name} {number} does not fit 32 bits")
    signed = Builder()
    signed.store_uint(subwallet_id, 32)
    signed.store_uint(valid_until, 32)
    signed.store_uint(seqno, 32)
    signed.store_uint(OP_SIMPLE_SEND, 8)
    signed.store_uint(TRANSFER_SEND_MODE, 8)
    signed.store_ref(wallet_internal_message(destination, value, body, state_init_cell))
    signed_cell = signed.end_cell()
    signature = VoucherSigner(wallet_seed).sign_hash(bytes(signed_cell.hash))
    message = Builder()
    message.store_bytes(signature)
    message.store_cell(signed_cell)
    return message.end_cell()


def wallet_external_message(
    wallet: Address, transfer: Cell, wallet_state_init_cell: Cell | None = None
) -> Cell:
    """The inbound external message carrying ``transfer`` to ``wallet``; with the
    wallet's StateInit when it is not deployed yet (its first send deploys it)."""
    builder = Builder()
    builder.store_uint(0b10, 2)  # ext_in_msg_info$10
    builder.store_uint(0, 2)  # src addr_none
    builder.store_address(wallet)
    builder.store_coins(0)  # import_fee
    if wallet_state_init_cell is None:
        builder.store_bit(0)
    else:
        builder.store_bit(1)
        builder.store_bit(1)
        builder.store_ref(wallet_state_init_cell)
    builder.store_bit(1)  # body in a ref: the liteserver and explorers see it whole
    builder.store_ref(transfer)
    return builder.end_cell()
