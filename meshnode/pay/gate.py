"""The provider's payment gate for one job on a TON payment channel.

`ChannelGates` is the job provider's gate factory: it finds the job's channel in the
ledger, serialises jobs per channel (vouchers are cumulative over the channel, so two
jobs at once would race for seqnos) and starts a `ProviderMeter` from the channel's last
accepted voucher. `MeteredGate` judges each voucher with the meter and writes it to the
ledger (fsync) *before* the meter counts it as paid, so no token is ever produced on the
strength of a voucher a crash could lose. A job names its channel with the channel client
key's proof (core.channel_auth), checked before it may wait for the channel's slot: a
channel id alone is public and would let anyone block the channel or spend its window.

Each job starts from "everything before is settled at the last voucher": a job that
ended with tokens still on credit (the client vanished) forgives at most one credit
window, which is the risk the window exists to bound; both ends compute the same base.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from meshnode.core.channel_auth import ChannelAuthError, verify_job_auth
from meshnode.core.messages import Open
from meshnode.core.meter import (
    ChannelTerms,
    Paid,
    Price,
    ProviderMeter,
    VoucherRejected,
)
from meshnode.core.voucher import VoucherError, parse_voucher
from meshnode.jobs.payment_gate import FreeGate, PaymentGate, PaymentRejected
from meshnode.pay.ledger import JobUsage, Ledger

CHANNEL_BUSY_WAIT_S = 5.0
"""A client starts its next job right after the previous Done, while the provider may
still be recording usage; a few seconds covers that, longer means a concurrent job."""


def rejection_code(exc: VoucherRejected) -> str:
    """Stable error code for a refused voucher, e.g. ``voucher_bad_signature``."""
    return f"voucher_{exc.reason.name.lower()}"


class MeteredGate:
    """PaymentGate over a ProviderMeter and the ledger, for one job on one channel."""

    def __init__(self, gates: ChannelGates, job: Open, provider_peer_id: str) -> None:
        self._gates = gates
        self._job = job
        self._provider_peer_id = provider_peer_id
        self._meter: ProviderMeter | None = None
        self._slot: trio.Semaphore | None = None
        self._delivered = 0
        """The most tokens the job let through (the provider sends what it may produce)."""

    @property
    def meter(self) -> ProviderMeter:
        if self._meter is None:
            raise RuntimeError("MeteredGate.start was not awaited")
        return self._meter

    async def start(self, prompt_tokens: int) -> None:
        channel_id = self._job.channel_id
        if channel_id is None:
            raise PaymentRejected(
                "payment_required", "this provider is priced: open a payment channel to it"
            )
        ledger = self._gates.ledger
        record = await trio.to_thread.run_sync(ledger.channel, channel_id)
        if record is None:
            raise PaymentRejected(
                "unknown_channel",
                f"channel {channel_id:#x} is unknown here; announce it on /meshnode/channel/1",
            )
        job = self._job
        try:
            verify_job_auth(
                record.client_key,
                job.auth,
                job.job_id,
                job.client_pub,
                channel_id,
                self._provider_peer_id,
            )
        except ChannelAuthError as exc:
            raise PaymentRejected("channel_auth", str(exc)) from exc
        slot = self._gates.slot(channel_id)
        with trio.move_on_after(CHANNEL_BUSY_WAIT_S):
            await slot.acquire()
            self._slot = slot
        if self._slot is None:
            raise PaymentRejected("channel_busy", "another job is running on this channel")
        latest = await trio.to_thread.run_sync(ledger.latest_voucher, channel_id)
        paid = Paid(latest.voucher.seqno, latest.voucher.sent) if latest else Paid()
        meter = ProviderMeter(
            ChannelTerms(channel_id, record.client_key, record.deposit),
            self._gates.price,
            self._gates.credit_window_tokens,
            owed_before=paid.sent,
            paid=paid,
        )
        meter.record_prompt(prompt_tokens)
        self._meter = meter

    def _owed_at(self, delivered: int) -> int:
        m = self.meter
        return m.owed_before + m.price.cost(m.prompt_tokens, delivered)

    def may_produce(self, delivered: int) -> bool:
        allowed = self._owed_at(delivered) - self.meter.paid.sent <= self.meter.credit
        if allowed:
            self._delivered = max(self._delivered, delivered)
        return allowed

    def owed(self, delivered: int) -> int:
        return self._owed_at(delivered)

    def settled(self, delivered: int) -> bool:
        self._delivered = max(self._delivered, delivered)
        return self._owed_at(delivered) <= self.meter.paid.sent

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        return self.meter.price.cost(prompt_tokens, completion_tokens)

    async def accept_voucher(self, boc: bytes, delivered: int) -> None:
        try:
            voucher = parse_voucher(boc)
        except VoucherError as exc:
            raise PaymentRejected("voucher_malformed", str(exc)) from exc
        meter = self.meter
        meter.completion_tokens = max(meter.completion_tokens, delivered)
        before = meter.paid
        try:
            accepted = meter.accept(voucher, self._gates.clock())
        except VoucherRejected as exc:
            raise PaymentRejected(rejection_code(exc), str(exc)) from exc
        # Not paid until it is on disk: the generation loop reads meter.paid.
        meter.paid = before
        await trio.to_thread.run_sync(
            self._gates.ledger.record_voucher, accepted.voucher, accepted.accepted_at
        )
        meter.paid = Paid(seqno=voucher.seqno, sent=voucher.sent)
        self._gates.vouchers_accepted += 1

    async def finish(self) -> None:
        """Record the job's usage durably and free the channel for its next job."""
        slot, self._slot = self._slot, None
        if slot is None:
            return  # refused at start, or already finished
        try:
            m = self.meter
            usage = JobUsage(
                job_id=self._job.job_id.hex(),
                channel_id=m.terms.channel_id,
                prompt_tokens=m.prompt_tokens,
                completion_tokens=self._delivered,
                cost=m.price.cost(m.prompt_tokens, self._delivered),
                updated_at=self._gates.clock(),
            )
            await trio.to_thread.run_sync(self._gates.ledger.record_usage, usage)
        finally:
            slot.release()


class ChannelGates:
    """The provider's gate factory: `provider_node(..., gate_factory=ChannelGates(...))`."""

    def __init__(
        self,
        ledger: Ledger,
        price: Price,
        credit_window_tokens: int,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ledger = ledger
        self.price = price
        self.credit_window_tokens = credit_window_tokens
        self.clock = clock
        self._slots: dict[int, trio.Semaphore] = {}
        self.vouchers_accepted = 0  # since start, for metrics (the ledger keeps the latest)

    @property
    def free(self) -> bool:
        return self.price.prompt_per_1k == 0 and self.price.completion_per_1k == 0

    def slot(self, channel_id: int) -> trio.Semaphore:
        """One job at a time per channel: vouchers are cumulative over the channel."""
        return self._slots.setdefault(channel_id, trio.Semaphore(1))

    def __call__(self, job: Open, provider_peer_id: str) -> PaymentGate:
        if self.free:
            return FreeGate()
        return MeteredGate(self, job, provider_peer_id)
