"""The client's Payer for one job on a TON payment channel.

The client never signs for more than it has received plus its credit window. It counts
completion tokens from the provider's Tokens frames; prompt tokens it cannot count
(light clients carry no tokenizer), so it bounds them by the prompt's UTF-8 length: no
tokenizer emits more tokens than bytes, plus a few special tokens. At Done it checks the
bill: the prompt count within that bound, the cost equal to the advertised price of the
counts, and the vouchers of this job adding up to exactly that cost.

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
from meshnode.core.meter import ChannelExhausted, ClientMeter, MeterError, Paid, Price
from meshnode.core.voucher import Voucher, VoucherSigner
from meshnode.jobs.payment_gate import PaymentRejected
from meshnode.pay.ledger import Ledger

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
    def deposit(self) -> int: ...

    @property
    def signer(self) -> VoucherSigner: ...

    @property
    def ledger(self) -> Ledger: ...

    latest: Voucher | None


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
        self.job_base = 0
        """The channel's cumulative payment when this job began."""
        self.vouchers: list[Voucher] = []
        """Vouchers this job signed, in order (the last one is the job's final state)."""

    @property
    def channel_id(self) -> int | None:
        return self._channel.channel_id

    @property
    def paid_for_job(self) -> int:
        latest = self._channel.latest
        return (latest.sent if latest else 0) - self.job_base

    def begin(self, prompt: str) -> None:
        latest = self._channel.latest
        paid = Paid(latest.seqno, latest.sent) if latest else Paid()
        self.job_base = paid.sent
        self._prompt_bound = prompt_token_bound(prompt)
        self._meter = ClientMeter(
            self._channel.channel_id,
            self._channel.deposit,
            self.price,
            self.credit_window_tokens,
            self._channel.signer,
            owed_before=paid.sent,
            paid=paid,
        )
        self._meter.received(self._prompt_bound, 0)

    def authorize(self, job_id: bytes, client_pub: bytes, provider_peer_id: str) -> bytes:
        return sign_job_auth(
            self._channel.signer, job_id, client_pub, self._channel.channel_id, provider_peer_id
        )

    async def voucher_for(self, owed: int, received: int) -> bytes:
        meter = self._meter
        if meter is None:
            raise PaymentRejected("payer_not_started", "begin() was not called for this job")
        try:
            meter.received(self._prompt_bound, received)
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
        await trio.to_thread.run_sync(self._channel.ledger.record_voucher, voucher, self._clock())
        self._channel.latest = voucher
        self.vouchers.append(voucher)
        return voucher.to_boc()

    def check_usage(self, usage: Usage) -> None:
        if usage.prompt_tokens > self._prompt_bound:
            raise PaymentRejected(
                "bad_bill",
                f"{usage.prompt_tokens} prompt tokens billed, the prompt allows "
                f"{self._prompt_bound}",
            )
        expected = self.price.cost(usage.prompt_tokens, usage.completion_tokens)
        if usage.cost_nanoton != expected:
            raise PaymentRejected(
                "bad_bill", f"billed {usage.cost_nanoton} nanoton, the price gives {expected}"
            )
        if self.paid_for_job != expected:
            raise PaymentRejected(
                "bad_bill", f"vouchers for this job pay {self.paid_for_job}, bill is {expected}"
            )
