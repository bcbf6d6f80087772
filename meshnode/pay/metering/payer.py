"""The client's Payer for one job on a TON payment channel.

The client pays exactly what it received: the provider's Accept states the prompt's
token count and what the channel owed before the job, and each voucher covers the
prompt plus the completion tokens received (never less, even if a provider that lost
count asks for less; never more than received plus the credit window). Before the
Accept it bounds the prompt by its UTF-8 length: no tokenizer emits more tokens than
bytes, plus a few special tokens. At Done it checks the bill: the prompt count, the
cost equal to the advertised price of the counts, and its vouchers paying exactly that.

A job that breaks leaves what was received and not yet paid as the channel's debt: the
payer records every job's usage in the client's ledger (`finish`), and the next voucher
on the channel (a later job, or the close) pays it. A provider may state a higher debt
than the client counts only after a job of the client's ended without its bill (tokens
may have been in flight), and by at most one window (core.meter).

Every voucher is written to the client's ledger before it is sent: after a crash the
client must continue from its highest seqno, or the provider would refuse the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import trio

from meshnode.core.channel_auth import sign_job_auth
from meshnode.core.messages import Usage
from meshnode.core.meter import (
    ChannelExhausted,
    ClientMeter,
    DebtDisputed,
    MeterError,
    Paid,
    Price,
)
from meshnode.core.voucher import Voucher, VoucherSigner
from meshnode.jobs.payment_gate import PaymentRejected
from meshnode.pay.channel.ledger import ChannelRef, JobUsage, Ledger

PROMPT_SPECIAL_TOKENS = 8
"""Tokens a template may add beyond the prompt's bytes (BOS/EOS and role markers)."""

DEFAULT_CLIENT_WINDOW_TOKENS = 32
"""How far ahead of what it received the client pays: several token chunks, so the
provider is not stalled on every chunk, yet a vanished provider costs little."""


class PayingChannel(Protocol):
    """What a payer needs from the client's channel (ClientChannel implements it)."""

    @property
    def channel_id(self) -> int: ...

    @property
    def ref(self) -> ChannelRef: ...

    @property
    def deposit(self) -> int: ...

    @property
    def signer(self) -> VoucherSigner: ...

    @property
    def ledger(self) -> Ledger: ...

    latest: Voucher | None
    owed: int
    """What the client counts as owed on the channel (its recorded jobs)."""
    uncertain: bool
    """The last job ended after its Accept but without its bill (tokens in flight)."""


def prompt_token_bound(prompt: str) -> int:
    return len(prompt.encode("utf-8")) + PROMPT_SPECIAL_TOKENS


class ChannelPayer:
    """Payer for one job; make a fresh one per job (`ClientChannel.payer(price)`)."""

    def __init__(
        self,
        channel: PayingChannel,
        price: Price,
        credit_window_tokens: int = DEFAULT_CLIENT_WINDOW_TOKENS,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._channel = channel
        self.price = price
        self.credit_window_tokens = credit_window_tokens
        self._clock = clock
        self._meter: ClientMeter | None = None
        self._prompt_bound = 0
        self._stated_prompt: int | None = None
        self._job_id = ""
        self._accepted = False
        self._recorded_owed = 0
        self.job_base = 0
        """The channel's cumulative payment when this job began."""
        self.adopted = 0
        """Debt the provider stated beyond this client's count, taken over (nanoton)."""
        self.charged = 0
        """What this job owes the provider (set by `finish`), its share of the channel."""
        self.vouchers: list[Voucher] = []
        """Vouchers this job signed, in order (the last one is the job's final state)."""

    @property
    def channel_id(self) -> int | None:
        return self._channel.channel_id

    @property
    def paid_for_job(self) -> int:
        latest = self._channel.latest
        return (latest.sent if latest else 0) - self.job_base

    @property
    def meter(self) -> ClientMeter:
        if self._meter is None:
            raise PaymentRejected("payer_not_started", "begin() was not called for this job")
        return self._meter

    def channel_key(self) -> bytes:
        return self._channel.signer.public_key

    def begin(self, prompt: str) -> None:
        latest = self._channel.latest
        paid = Paid(latest.seqno, latest.sent) if latest else Paid()
        self.job_base = paid.sent
        self._recorded_owed = self._channel.owed
        self._prompt_bound = prompt_token_bound(prompt)
        self._meter = ClientMeter(
            self._channel.channel_id,
            self._channel.deposit,
            self.price,
            self.credit_window_tokens,
            self._channel.signer,
            owed_before=max(self._channel.owed, paid.sent),
            paid=paid,
        )
        self._meter.received(self._prompt_bound, 0)

    def authorize(self, job_id: bytes, client_pub: bytes, provider_peer_id: str) -> bytes:
        self._job_id = job_id.hex()
        return sign_job_auth(
            self._channel.signer, job_id, client_pub, self._channel.channel_id, provider_peer_id
        )

    def accepted(self, prompt_tokens: int | None, owed_before: int | None) -> None:
        meter = self.meter
        self._accepted = True
        if prompt_tokens is not None:
            if prompt_tokens > self._prompt_bound:
                raise PaymentRejected(
                    "bad_bill",
                    f"{prompt_tokens} prompt tokens stated, the prompt allows {self._prompt_bound}",
                )
            self._stated_prompt = prompt_tokens
            meter.prompt_tokens = prompt_tokens  # the bound until now; nothing signed on it
        if owed_before is not None:
            allowance = (
                self.price.window_cost(self.credit_window_tokens) if self._channel.uncertain
                else 0
            )
            try:
                self.adopted = meter.adopt(owed_before, allowance)
            except DebtDisputed as exc:
                raise PaymentRejected("debt_disputed", str(exc)) from exc

    async def voucher_for(self, owed: int, received: int) -> bytes:
        meter = self.meter
        try:
            meter.received(meter.prompt_tokens, received)
            voucher = meter.pay(owed)
        except ChannelExhausted as exc:
            raise PaymentRejected("channel_exhausted", str(exc)) from exc
        except MeterError as exc:
            raise PaymentRejected("bad_count", str(exc)) from exc
        if voucher is None:
            latest = self._channel.latest
            if latest is None or latest.sent < owed:
                raise PaymentRejected(
                    "overbilled",
                    f"provider asks {owed} nanoton; received tokens allow {meter.ceiling}",
                )
            # Already signed (a voucher the provider may not have seen before a crash).
            return latest.to_boc()
        await trio.to_thread.run_sync(
            self._channel.ledger.record_voucher, self._channel.ref, voucher, self._clock()
        )
        self._channel.latest = voucher
        self.vouchers.append(voucher)
        return voucher.to_boc()

    def check_usage(self, usage: Usage) -> None:
        if usage.prompt_tokens > self._prompt_bound or (
            self._stated_prompt is not None and usage.prompt_tokens != self._stated_prompt
        ):
            raise PaymentRejected(
                "bad_bill",
                f"{usage.prompt_tokens} prompt tokens billed, the prompt allows "
                f"{self._prompt_bound} (stated {self._stated_prompt})",
            )
        expected = self.price.cost(usage.prompt_tokens, usage.completion_tokens)
        if usage.cost_nanoton != expected:
            raise PaymentRejected(
                "bad_bill", f"billed {usage.cost_nanoton} nanoton, the price gives {expected}"
            )
        meter = self.meter
        meter.prompt_tokens = usage.prompt_tokens
        meter.received(usage.prompt_tokens, usage.completion_tokens)
        if meter.paid.sent != meter.owed_now:
            raise PaymentRejected(
                "bad_bill",
                f"vouchers on the channel pay {meter.paid.sent}, owed {meter.owed_now}",
            )

    async def finish(self, received: int, complete: bool) -> None:
        meter = self._meter
        if meter is None or not self._accepted:
            return  # refused before Accept: nothing received, nothing owed
        if received > meter.completion_tokens:
            meter.completion_tokens = received
        owed = max(meter.owed_now, meter.paid.sent)
        usage = JobUsage(
            job_id=self._job_id or f"job-{self._clock()}",
            ref=self._channel.ref,
            prompt_tokens=meter.prompt_tokens if meter.completion_tokens else 0,
            completion_tokens=meter.completion_tokens,
            cost=owed - self._recorded_owed,
            updated_at=self._clock(),
            complete=complete,
        )
        await trio.to_thread.run_sync(self._channel.ledger.record_usage, usage)
        self.charged = owed - self._recorded_owed - self.adopted
        self._channel.owed = owed
        self._channel.uncertain = not complete
