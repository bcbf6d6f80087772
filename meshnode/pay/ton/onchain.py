"""Reading a payment channel's state from the chain, and calling the chain from trio.

``get_channel_data`` returns the contract's whole storage as a stack; ``ChannelView``
is that stack decoded. Chain calls block (a liteserver round trip, or the emulator's
TVM run), so the shell runs them in a worker thread, one at a time per process: the
emulator is not thread-safe, and channel operations are rare enough that serialising
them costs nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell
from pytoniq_core.boc.slice import Slice
from pytoniq_core.tlb.vm_stack import VmTuple

from meshnode.pay.ton.chain import Chain

T = TypeVar("T")

_CHAIN_LOCK = threading.Lock()


class ChannelReadError(Exception):
    """The address does not hold a payment channel we can read."""


async def on_chain(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking chain call in a worker thread, serialised process-wide."""

    def locked() -> T:
        with _CHAIN_LOCK:
            return fn(*args)

    return await trio.to_thread.run_sync(locked)


@dataclass(frozen=True, slots=True)
class Quarantine:
    """A state submitted for uncooperative close, waiting out its quarantine."""

    seqno_a: int
    sent_a: int
    seqno_b: int
    sent_b: int
    started_at: int
    committed_by_a: bool
    challenged: bool


@dataclass(frozen=True, slots=True)
class ChannelView:
    """What ``get_channel_data`` says about one channel contract."""

    state: int
    balance_a: int
    balance_b: int
    key_a: bytes
    key_b: bytes
    channel_id: int
    quarantine_duration: int
    misbehavior_fine: int
    conditional_close_duration: int
    committed_seqno_a: int
    committed_seqno_b: int
    quarantine: Quarantine | None
    excess_fee: int
    address_a: Address
    address_b: Address


def raw_address(address: Address) -> str:
    """``wc:hex`` form: unambiguous, no bounce/testnet flags to disagree about."""
    return f"{address.wc}:{bytes(address.hash_part).hex()}"


def _items(value: Any, n: int, what: str) -> list[Any]:
    if isinstance(value, VmTuple):
        items = list(value.list)
    elif isinstance(value, list):
        items = value
    else:
        items = []
    if len(items) != n:
        raise ChannelReadError(f"{what}: expected {n} items, got {value!r}")
    return items


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ChannelReadError(f"{what}: expected an int, got {value!r}")
    return value


def _address(value: Any, what: str) -> Address:
    if not isinstance(value, Slice):
        raise ChannelReadError(f"{what}: expected an address slice, got {value!r}")
    address = value.load_address()
    if not isinstance(address, Address):
        raise ChannelReadError(f"{what}: not an internal address")
    return address


def _quarantine(value: Any) -> Quarantine | None:
    if value is None:
        return None
    if not isinstance(value, Cell):
        raise ChannelReadError(f"quarantine: expected a cell, got {value!r}")
    cs = value.begin_parse()  # type: ignore[no-untyped-call]
    seqno_a, sent_a = cs.load_uint(64), cs.load_coins()
    cs.load_bit()  # A's conditionals: we never create any
    seqno_b, sent_b = cs.load_uint(64), cs.load_coins()
    cs.load_bit()
    return Quarantine(
        seqno_a=seqno_a,
        sent_a=sent_a or 0,
        seqno_b=seqno_b,
        sent_b=sent_b or 0,
        started_at=cs.load_uint(32),
        committed_by_a=bool(cs.load_bit()),
        challenged=bool(cs.load_bit()),
    )


def decode_channel_data(stack: list[Any]) -> ChannelView:
    """Decode the ``get_channel_data`` stack (layout of the official contract)."""
    state, balances, keys, channel_id, closing, seqnos, quarantine, payment = _items(
        stack, 8, "get_channel_data"
    )
    balance_a, balance_b = _items(balances, 2, "balances")
    key_a, key_b = _items(keys, 2, "keys")
    quarantine_s, fine, conditional_s = _items(closing, 3, "closing config")
    seqno_a, seqno_b = _items(seqnos, 2, "committed seqnos")
    excess_fee, address_a, address_b = _items(payment, 3, "payment config")
    return ChannelView(
        state=_int(state, "state"),
        balance_a=_int(balance_a, "balance A"),
        balance_b=_int(balance_b, "balance B"),
        key_a=_int(key_a, "key A").to_bytes(32, "big"),
        key_b=_int(key_b, "key B").to_bytes(32, "big"),
        channel_id=_int(channel_id, "channel id"),
        quarantine_duration=_int(quarantine_s, "quarantine duration"),
        misbehavior_fine=_int(fine, "fine"),
        conditional_close_duration=_int(conditional_s, "conditional close duration"),
        committed_seqno_a=_int(seqno_a, "committed seqno A"),
        committed_seqno_b=_int(seqno_b, "committed seqno B"),
        quarantine=_quarantine(quarantine),
        excess_fee=_int(excess_fee, "excess fee"),
        address_a=_address(address_a, "address A"),
        address_b=_address(address_b, "address B"),
    )


def read_channel(chain: Chain, address: Address) -> ChannelView:
    """Blocking: the channel contract's data at ``address`` (use through on_chain)."""
    try:
        stack = chain.get_stack(address, "get_channel_data")
    except Exception as exc:  # an emulator or liteserver error: no contract there
        raise ChannelReadError(f"cannot read a channel at {address}: {exc}") from exc
    return decode_channel_data(stack)
