"""How the job protocol asks the payment layer for permission, on both sides.

The job code only needs these small interfaces; the TON channel meter implements them in
meshnode.pay, and `FreeGate`/`NoPayer` serve free providers (dev and demo nodes).
"""

from __future__ import annotations

from typing import Protocol

from meshnode.core.messages import Usage


class PaymentRejected(Exception):
    """A voucher the provider will not accept; `code` is a stable reason."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code


class PaymentGate(Protocol):
    """Provider side, one instance per job: `start` first, `finish` always, last."""

    async def start(self, prompt_tokens: int) -> None:
        """Admit the job (before Accept); raise PaymentRejected to refuse it."""
        ...

    def may_produce(self, delivered: int) -> bool:
        """True while unpaid tokens stay within the credit window."""
        ...

    def owed(self, delivered: int) -> int:
        """Nanoton the client must have signed for before the next token."""
        ...

    def settled(self, delivered: int) -> bool:
        """True when vouchers cover every delivered token (nothing left on credit)."""
        ...

    async def accept_voucher(self, boc: bytes, delivered: int) -> None:
        """Check and durably record a voucher; raise PaymentRejected otherwise."""
        ...

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int: ...

    async def finish(self) -> None:
        """The job is over (completed or not): record its usage, free its channel."""
        ...


class Payer(Protocol):
    """Client side, one instance per job."""

    @property
    def channel_id(self) -> int | None:
        """The channel the job's Open names (None: the client offers no payment)."""
        ...

    def begin(self, prompt: str) -> None:
        """Called once before Open: the prompt bounds what its tokens may cost."""
        ...

    def authorize(self, job_id: bytes, client_pub: bytes, provider_peer_id: str) -> bytes | None:
        """Open.auth: the channel key's proof that this job at this provider may use the
        channel (core.channel_auth); None when the payer has no channel."""
        ...

    async def voucher_for(self, owed: int, received: int) -> bytes:
        """A signed state covering `owed`; raise PaymentRejected to refuse."""
        ...

    def check_usage(self, usage: Usage) -> None:
        """Check the provider's final bill (Done); raise PaymentRejected if it is wrong."""
        ...


class FreeGate:
    async def start(self, prompt_tokens: int) -> None:
        return None

    def may_produce(self, delivered: int) -> bool:
        return True

    def owed(self, delivered: int) -> int:
        return 0

    def settled(self, delivered: int) -> bool:
        return True

    async def accept_voucher(self, boc: bytes, delivered: int) -> None:
        raise PaymentRejected("not_accepted", "this provider is free and takes no vouchers")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        return 0

    async def finish(self) -> None:
        return None


class NoPayer:
    @property
    def channel_id(self) -> int | None:
        return None

    def begin(self, prompt: str) -> None:
        return None

    def authorize(self, job_id: bytes, client_pub: bytes, provider_peer_id: str) -> bytes | None:
        return None

    def check_usage(self, usage: Usage) -> None:
        return None

    async def voucher_for(self, owed: int, received: int) -> bytes:
        raise PaymentRejected(
            "no_channel", "the provider asks for payment but this client has no open channel"
        )
