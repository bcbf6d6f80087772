"""How the job protocol asks the payment layer for permission, on both sides.

The job code only needs these small interfaces; the TON channel meter implements them in
meshnode.pay, and `FreeGate`/`NoPayer` serve free providers (dev and demo nodes).
"""

from __future__ import annotations

from typing import Protocol


class PaymentRejected(Exception):
    """A voucher the provider will not accept; `code` is a stable reason."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code


class PaymentGate(Protocol):
    """Provider side, one instance per job."""

    def may_produce(self, delivered: int) -> bool:
        """True while unpaid tokens stay within the credit window."""
        ...

    def owed(self, delivered: int) -> int:
        """Nanoton the client must have signed for before the next token."""
        ...

    async def accept_voucher(self, boc: bytes, delivered: int) -> None:
        """Check and durably record a voucher; raise PaymentRejected otherwise."""
        ...

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int: ...


class Payer(Protocol):
    """Client side, one instance per job."""

    async def voucher_for(self, owed: int, received: int) -> bytes:
        """A signed state covering `owed`; raise PaymentRejected to refuse."""
        ...


class FreeGate:
    def may_produce(self, delivered: int) -> bool:
        return True

    def owed(self, delivered: int) -> int:
        return 0

    async def accept_voucher(self, boc: bytes, delivered: int) -> None:
        raise PaymentRejected("not_accepted", "this provider is free and takes no vouchers")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        return 0


class NoPayer:
    async def voucher_for(self, owed: int, received: int) -> bytes:
        raise PaymentRejected(
            "no_channel", "the provider asks for payment but this client has no open channel"
        )
