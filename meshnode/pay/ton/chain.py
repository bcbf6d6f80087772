"""What the payment code needs from a TON chain, whoever provides it.

Two implementations are meant to sit behind ``Chain``: the in-process emulator
(``meshnode.pay.ton.emulator``, for tests and local nets) and, later, a pytoniq LiteClient
adapter for the real network. The protocol is synchronous like the ledger: the trio
shell calls it through ``trio.to_thread.run_sync`` (pytoniq's asyncio client would run
its own loop in that thread).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell

EXIT_CODES_SUCCESS = (0, 1)
"""TVM compute phase exit codes that mean the contract accepted the message."""


@dataclass(frozen=True, slots=True)
class Transfer:
    """A value-carrying message the chain delivered as a result of a send."""

    source: Address
    destination: Address
    value: int
    body: Cell | None = None


@dataclass(frozen=True, slots=True)
class SendResult:
    """Outcome of the transaction the sent message caused at its destination."""

    exit_code: int
    gas_used: int = 0
    transfers: tuple[Transfer, ...] = field(default_factory=tuple)

    @property
    def success(self) -> bool:
        return self.exit_code in EXIT_CODES_SUCCESS


class Chain(Protocol):
    """Balances, message sending and get-methods: all the channel lifecycle needs."""

    def now(self) -> int:
        """The chain's current unix time (quarantine deadlines are judged by it)."""
        ...

    def balance(self, address: Address) -> int:
        """Nanoton held by ``address`` (0 for an unknown account)."""
        ...

    def send(
        self,
        sender: Address,
        destination: Address,
        value: int,
        body: Cell,
        state_init: Cell | None = None,
    ) -> SendResult:
        """Send ``value`` with ``body`` from the ``sender`` wallet; deploy if state_init."""
        ...

    def get_int(self, address: Address, method: str) -> int:
        """Run an integer-returning get-method (e.g. ``get_channel_state``)."""
        ...

    def get_stack(self, address: Address, method: str) -> list[Any]:
        """Run a get-method and return its whole result stack, bottom first
        (ints, Cells, Slices, None and VmTuples, as pytoniq-core decodes them)."""
        ...
