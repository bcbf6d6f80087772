"""The provider's payment gate for one job on a TON payment channel.

`ChannelGates` is the job provider's gate factory. A job names its channel by id *and*
party-A key (ids are chosen by clients and may repeat), with that key's proof
(core.channel_auth), checked before the job may hold any of the channel's places.
Admission is per channel: a channel holds at most ``MAX_CHANNEL_PLACES`` jobs (one runs,
one waits), runs one at a time (vouchers are cumulative over the channel, so two jobs
would race for seqnos), and is admitted only while it is open (no close co-signed or
under way) and its unspent deposit covers its debt plus one credit window
(core.meter.admits). One cheap channel therefore cannot fill the provider's queue, and
a channel that cannot pay buys nothing.

`MeteredGate` judges each voucher with a `ProviderMeter` and writes it to the ledger
(fsync) *before* the meter counts it as paid, so no token is ever produced on the
strength of a voucher a crash could lose. Each job starts from what the channel owes
(the recorded cost of its jobs, or the last voucher if that is more): a job that ended
with tokens on credit leaves a debt the next job pays before its first token.
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
    admits,
)
from meshnode.core.voucher import VoucherError, parse_voucher
from meshnode.jobs.payment_gate import FreeGate, PaymentGate, PaymentRejected
from meshnode.pay.channel.ledger import ChannelRecord, ChannelRef, JobUsage, Ledger

CHANNEL_BUSY_WAIT_S = 5.0
"""A client starts its next job right after the previous Done, while the provider may
still be recording usage; a few seconds covers that, longer means a concurrent job."""

MAX_CHANNEL_PLACES = 2
"""Jobs one channel may hold at once, running or waiting: one runs, the client's next is
already queued behind it. More would only hold queue places that other channels need,
which is how one cheap channel used to starve every paying one."""


def rejection_code(exc: VoucherRejected) -> str:
    """Stable error code for a refused voucher, e.g. ``voucher_bad_signature``."""
    return f"voucher_{exc.reason.name.lower()}"


class MeteredGate:
    """PaymentGate over a ProviderMeter and the ledger, for one job on one channel."""

    def __init__(self, gates: ChannelGates, job: Open, provider_peer_id: str) -> None:
        self._gates = gates
        self._job = job
        self._provider_peer_id = provider_peer_id
        self._record: ChannelRecord | None = None
        self._meter: ProviderMeter | None = None
        self._slot: trio.Semaphore | None = None
        self._delivered = 0
        """The most tokens the job let through (the provider sends what it may produce)."""

    @property
    def meter(self) -> ProviderMeter:
        if self._meter is None:
            raise RuntimeError("MeteredGate.start was not awaited")
        return self._meter

    @property
    def record(self) -> ChannelRecord:
        if self._record is None:
            raise RuntimeError("MeteredGate.admit was not awaited")
        return self._record

    async def admit(self) -> None:
        job = self._job
        if job.channel_id is None:
            raise PaymentRejected(
                "payment_required", "this provider is priced: open a payment channel to it"
            )
        if job.channel_key is None:
            raise PaymentRejected(
                "channel_key_missing", "name the channel with its id and its party-A key"
            )
        ref = ChannelRef(job.channel_id, job.channel_key)
        record = await trio.to_thread.run_sync(self._gates.ledger.channel, ref)
        if record is None:
            raise PaymentRejected(
                "unknown_channel",
                f"channel {ref} is unknown here; announce it on /meshnode/channel/1",
            )
        try:
            verify_job_auth(
                record.client_key,
                job.auth,
                job.job_id,
                job.client_pub,
                job.channel_id,
                self._provider_peer_id,
            )
        except ChannelAuthError as exc:
            raise PaymentRejected("channel_auth", str(exc)) from exc
        if not record.is_open:
            raise PaymentRejected(
                "channel_closed", f"channel {ref} is {record.state}: open a new channel"
            )
        # Checked again (authoritatively) in start; here so that a channel that cannot
        # pay never takes one of the queue places all channels share.
        await self._check_deposit(record)
        if not self._gates.take_place(ref):
            raise PaymentRejected(
                "channel_busy", f"channel {ref} already holds {MAX_CHANNEL_PLACES} jobs"
            )
        self._record = record

    async def start(self, prompt_tokens: int) -> None:
        record = self.record
        ref = record.ref
        slot = self._gates.slot(ref)
        with trio.move_on_after(CHANNEL_BUSY_WAIT_S):
            await slot.acquire()
            self._slot = slot
        if self._slot is None:
            raise PaymentRejected("channel_busy", "another job is running on this channel")
        ledger = self._gates.ledger
        current = await trio.to_thread.run_sync(ledger.channel, ref)
        if current is None or not current.is_open:  # closed while this job waited
            state = "gone" if current is None else current.state
            raise PaymentRejected("channel_closed", f"channel {ref} is {state}")
        paid, owed_before = await self._check_deposit(current)
        meter = ProviderMeter(
            ChannelTerms(ref.channel_id, record.client_key, current.deposit),
            self._gates.price,
            self._gates.credit_window_tokens,
            owed_before=owed_before,
            paid=paid,
        )
        meter.record_prompt(prompt_tokens)
        self._meter = meter

    async def _check_deposit(self, record: ChannelRecord) -> tuple[Paid, int]:
        """(the last payment, what the channel owes) if its unspent deposit covers the
        debt plus one credit window; else PaymentRejected."""
        ledger = self._gates.ledger
        latest = await trio.to_thread.run_sync(ledger.latest_voucher, record.ref)
        recorded = await trio.to_thread.run_sync(ledger.channel_owed, record.ref)
        paid = Paid(latest.voucher.seqno, latest.voucher.sent) if latest else Paid()
        owed_before = max(recorded, paid.sent)
        credit = self._gates.price.window_cost(self._gates.credit_window_tokens)
        if not admits(record.deposit, owed_before, credit):
            raise PaymentRejected(
                "deposit_low",
                f"channel {record.ref} has {record.deposit - owed_before} nanoton of deposit "
                f"left (debt {owed_before - paid.sent}); a job needs {credit}: open a new "
                "channel",
            )
        return paid, owed_before

    @property
    def owed_before(self) -> int | None:
        return self.meter.owed_before

    def may_produce(self, upto: int) -> bool:
        allowed = self.meter.may_go_to(upto)
        if allowed:
            self._delivered = max(self._delivered, upto)
        return allowed

    def exhausted(self, upto: int) -> bool:
        return self.meter.exhausted(upto)

    def ask(self, delivered: int, upto: int) -> int:
        return self.meter.ask(delivered, upto)

    def settled(self, delivered: int) -> bool:
        self._delivered = max(self._delivered, delivered)
        return self.meter.settled(delivered)

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
            self._gates.ledger.record_voucher, self.record.ref, accepted.voucher,
            accepted.accepted_at,
        )
        meter.paid = Paid(seqno=voucher.seqno, sent=voucher.sent)
        self._gates.vouchers_accepted += 1

    async def finish(self) -> None:
        """Record the job's usage durably and free the channel for its next job."""
        record, self._record = self._record, None
        if record is None:
            return  # refused before admission, or already finished
        slot, self._slot = self._slot, None
        try:
            m = self._meter
            if m is not None:
                usage = JobUsage(
                    job_id=self._job.job_id.hex(),
                    ref=record.ref,
                    prompt_tokens=m.prompt_tokens,
                    completion_tokens=self._delivered,
                    cost=m.billed(self._delivered) - m.owed_before,
                    updated_at=self._gates.clock(),
                    complete=m.settled(self._delivered),
                )
                await trio.to_thread.run_sync(self._gates.ledger.record_usage, usage)
        finally:
            if slot is not None:
                slot.release()
            self._gates.free_place(record.ref)


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
        self._slots: dict[str, trio.Semaphore] = {}
        self._places: dict[str, int] = {}
        self.vouchers_accepted = 0  # since start, for metrics (the ledger keeps the latest)

    @property
    def free(self) -> bool:
        return self.price.prompt_per_1k == 0 and self.price.completion_per_1k == 0

    def slot(self, ref: ChannelRef) -> trio.Semaphore:
        """One job at a time per channel: vouchers are cumulative over the channel."""
        return self._slots.setdefault(ref.key, trio.Semaphore(1))

    def take_place(self, ref: ChannelRef) -> bool:
        held = self._places.get(ref.key, 0)
        if held >= MAX_CHANNEL_PLACES:
            return False
        self._places[ref.key] = held + 1
        return True

    def free_place(self, ref: ChannelRef) -> None:
        held = self._places.get(ref.key, 0) - 1
        if held > 0:
            self._places[ref.key] = held
        else:
            self._places.pop(ref.key, None)
            self._slots.pop(ref.key, None)

    def busy(self, ref: ChannelRef) -> bool:
        """Whether a job holds a place on the channel (a close must wait for it)."""
        return ref.key in self._places

    def __call__(self, job: Open, provider_peer_id: str) -> PaymentGate:
        if self.free:
            return FreeGate()
        return MeteredGate(self, job, provider_peer_id)
