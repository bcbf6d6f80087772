"""How the job protocol asks the payment layer for permission, on both sides.

The job code only needs these small interfaces; the TON channel meter implements them in
meshnode.pay, and `FreeGate`/`NoPayer` serve free providers (dev and demo nodes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol, runtime_checkable

import trio
from libp2p.abc import IHost
from trio_typing import TaskStatus

from meshnode.core.advert import Advert
from meshnode.core.messages import Usage


class PaymentRejected(Exception):
    """A voucher the provider will not accept; `code` is a stable reason."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code


class PaymentGate(Protocol):
    """Provider side, one instance per job: `admit` first, `finish` always, last.

    Counts are completion tokens: `delivered` went out, `upto` would be out after the
    next chunk."""

    async def admit(self) -> None:
        """Cheap checks before the job takes a queue place (the channel is known, open,
        and named with its key's proof; it has a free place of its own); raise
        PaymentRejected to refuse."""
        ...

    async def start(self, prompt_tokens: int) -> None:
        """Admit the job (before Accept): wait for the channel, check its deposit covers
        the debt and a window; raise PaymentRejected to refuse it."""
        ...

    @property
    def owed_before(self) -> int | None:
        """What the channel owed before this job (for Accept; None: free)."""
        ...

    def may_produce(self, upto: int) -> bool:
        """True while `upto` tokens may be out: debt paid, unpaid within the window."""
        ...

    def exhausted(self, upto: int) -> bool:
        """True when the channel's deposit can never pay for `upto` tokens."""
        ...

    def ask(self, delivered: int, upto: int) -> int:
        """Nanoton the client must have signed for before tokens up to `upto` go out."""
        ...

    def settled(self, delivered: int) -> bool:
        """True when vouchers cover every delivered token (nothing left on credit)."""
        ...

    async def accept_voucher(self, boc: bytes, delivered: int) -> None:
        """Check and durably record a voucher; raise PaymentRejected otherwise."""
        ...

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int: ...

    async def finish(self) -> None:
        """The job is over (completed or not, or refused): record its usage, free its
        channel's place."""
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

    def channel_key(self) -> bytes | None:
        """The channel's party-A public key (names the channel with its id)."""
        ...

    def accepted(self, prompt_tokens: int | None, owed_before: int | None) -> None:
        """The provider's Accept: its prompt count and what it says the channel owed
        before this job; raise PaymentRejected if the client cannot agree."""
        ...

    async def voucher_for(self, owed: int, received: int) -> bytes:
        """A signed state covering `owed`; raise PaymentRejected to refuse."""
        ...

    def check_usage(self, usage: Usage) -> None:
        """Check the provider's final bill (Done); raise PaymentRejected if it is wrong."""
        ...

    async def finish(self, received: int, complete: bool) -> None:
        """The job is over: record what it received (`complete`: it ended with a Done
        whose bill checked), so the channel's debt survives a restart."""
        ...

    @property
    def charged(self) -> int:
        """Nanoton this job owes the provider (known after `finish`)."""
        ...


class FreeGate:
    async def admit(self) -> None:
        return None

    async def start(self, prompt_tokens: int) -> None:
        return None

    @property
    def owed_before(self) -> int | None:
        return None

    def may_produce(self, upto: int) -> bool:
        return True

    def exhausted(self, upto: int) -> bool:
        return False

    def ask(self, delivered: int, upto: int) -> int:
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

    def channel_key(self) -> bytes | None:
        return None

    def accepted(self, prompt_tokens: int | None, owed_before: int | None) -> None:
        return None

    def check_usage(self, usage: Usage) -> None:
        return None

    async def finish(self, received: int, complete: bool) -> None:
        return None

    @property
    def charged(self) -> int:
        return 0

    async def voucher_for(self, owed: int, received: int) -> bytes:
        raise PaymentRejected(
            "no_channel", "the provider asks for payment but this client has no open channel"
        )


class PaymentUnavailable(Exception):
    """The client cannot pay this provider now (over budget, no wallet advertised, the
    chain or the provider refused the channel): try another provider."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code


class JobPayments(Protocol):
    """How routed jobs pay (client side): which providers the client can afford, and
    the payer for one job there (None: the provider is free). `meshnode.pay` implements
    it with channels opened on demand within a budget; `PayNothing` pays no one."""

    def affordable(self, advert: Advert, model_id: str, prompt: str, max_tokens: int) -> bool:
        ...

    def job(
        self, advert: Advert, model_id: str, prompt: str, max_tokens: int
    ) -> AbstractAsyncContextManager[Payer | None]:
        """The payer for one job; raise PaymentUnavailable if there is none."""
        ...


class PayNothing:
    """No payments: every provider is tried, and a priced one refuses the job."""

    def affordable(self, advert: Advert, model_id: str, prompt: str, max_tokens: int) -> bool:
        return True

    @asynccontextmanager
    async def job(
        self, advert: Advert, model_id: str, prompt: str, max_tokens: int
    ) -> AsyncIterator[Payer | None]:
        yield None


@runtime_checkable
class PaymentService(JobPayments, Protocol):
    """JobPayments that live as long as the client node: attached to its host, dialer
    and directory, with a background task (loading state, closing idle channels)."""

    def attach(
        self,
        host: IHost,
        dial: Callable[[Advert], Awaitable[None]],
        lookup: Callable[[str | None, bytes | None], Advert | None],
    ) -> None: ...

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ...
