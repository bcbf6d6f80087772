"""Per-token metering on both ends of a payment channel (sans-io; time is a parameter).

Amounts are nanoton. A channel's voucher carries the client's *cumulative* payment over
the whole channel, so both meters start a job from two facts they agree on: what the
earlier jobs on this channel cost (``owed_before``) and the last accepted voucher.

The provider lets the client run at most ``credit_window_tokens`` (priced as completion
tokens) ahead of payment; the client never signs for more than it has received plus that
same window, so a provider that vanishes costs the client at most one window.

Debt. Payment follows delivery, so a job that ends early (the client vanished, the
provider was killed) leaves up to one window unpaid. That debt is carried, not forgiven:
the provider's ``owed_before`` is the channel's recorded cost, the next job on the channel
must pay it before its first token, and a channel is admitted only while its unspent
deposit covers the debt plus one more window (``admits``). So a client that abandons
every job gets at most one window free per channel, once. A job that delivered no
completion token costs nothing beyond what was paid during it (the client saw nothing).
The client pays exactly what it received, and carries its own debt (a killed provider
is paid by a later voucher). At a job's start the provider states its ``owed_before``;
the client takes a higher figure only after a job of its own ended without a final bill
(tokens may have been in flight), and only within one window (``ClientMeter.adopt``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from meshnode.core.voucher import BadSignature, Voucher, VoucherSigner, VoucherState

CONTRACT_SEQNO_LIMIT = 1 << 32
"""The contract stores committed seqnos as uint32: a larger seqno could never be
committed on chain, so it is refused off chain too."""

TOKENS_PER_PRICE_UNIT = 1000
"""Prices are quoted per 1k tokens (as in the advert)."""


class MeterError(ValueError):
    """A metering call with arguments that cannot be right (negative counts, ...)."""


def admits(deposit: int, owed_before: int, credit: int) -> bool:
    """Whether a channel may start a job: its unspent deposit covers everything owed on
    it so far (the debt included) plus one more credit window."""
    return deposit - owed_before >= credit


@dataclass(frozen=True, slots=True)
class Price:
    """Nanoton per 1k prompt tokens and per 1k completion tokens."""

    prompt_per_1k: int
    completion_per_1k: int

    def __post_init__(self) -> None:
        if self.prompt_per_1k < 0 or self.completion_per_1k < 0:
            raise MeterError("prices cannot be negative")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        """Cost of a job's cumulative usage, rounded up so the provider is never short."""
        if prompt_tokens < 0 or completion_tokens < 0:
            raise MeterError("token counts cannot be negative")
        numerator = prompt_tokens * self.prompt_per_1k + completion_tokens * self.completion_per_1k
        return -(-numerator // TOKENS_PER_PRICE_UNIT)

    def window_cost(self, tokens: int) -> int:
        """Nanoton the credit window is worth (window tokens priced as completion)."""
        return self.cost(0, tokens)


@dataclass(frozen=True, slots=True)
class ChannelTerms:
    """What both sides know about the channel before any job runs."""

    channel_id: int
    client_public_key: bytes
    deposit: int
    """The client's on-chain balance in the channel: no voucher may exceed it."""


@dataclass(frozen=True, slots=True)
class Paid:
    """The latest accepted payment on a channel (seqno 0, sent 0 before any voucher)."""

    seqno: int = 0
    sent: int = 0


class RejectReason(enum.Enum):
    WRONG_CHANNEL = "voucher is for another channel"
    BAD_SIGNATURE = "voucher is not signed by the channel's client key"
    SEQNO_NOT_RISING = "voucher seqno is not above the last accepted one"
    SEQNO_BEYOND_CONTRACT = "voucher seqno does not fit the contract's uint32"
    SENT_DECREASED = "voucher pays less in total than an earlier voucher"
    UNDERPAID = "voucher leaves more unpaid than the credit window"
    EXCEEDS_DEPOSIT = "voucher promises more than the client deposited"


class VoucherRejected(Exception):
    """The provider refuses a voucher; ``reason`` says which rule it broke."""

    def __init__(self, reason: RejectReason, detail: str = "") -> None:
        super().__init__(f"{reason.value}{': ' + detail if detail else ''}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Accepted:
    """A voucher the provider accepted; persist it before producing more tokens."""

    voucher: Voucher
    accepted_at: float
    owed: int
    """Cumulative nanoton owed on the channel when it was accepted."""


class ProviderMeter:
    """Provider side of one job: counts delivered tokens and judges vouchers."""

    def __init__(
        self,
        terms: ChannelTerms,
        price: Price,
        credit_window_tokens: int,
        *,
        owed_before: int = 0,
        paid: Paid = Paid(),  # frozen, so sharing the default is safe
    ) -> None:
        if credit_window_tokens < 0 or owed_before < 0:
            raise MeterError("credit window and owed_before cannot be negative")
        self.terms = terms
        self.price = price
        self.credit_window_tokens = credit_window_tokens
        self.owed_before = owed_before
        self.paid = paid
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def credit(self) -> int:
        return self.price.window_cost(self.credit_window_tokens)

    @property
    def job_cost(self) -> int:
        return self.price.cost(self.prompt_tokens, self.completion_tokens)

    @property
    def owed(self) -> int:
        """Cumulative nanoton the channel's vouchers must reach to pay for everything."""
        return self.owed_before + self.job_cost

    @property
    def unpaid(self) -> int:
        return max(0, self.owed - self.paid.sent)

    def record_prompt(self, tokens: int) -> None:
        if tokens < 0:
            raise MeterError("token counts cannot be negative")
        self.prompt_tokens += tokens

    def record_completion(self, tokens: int) -> None:
        if tokens < 0:
            raise MeterError("token counts cannot be negative")
        self.completion_tokens += tokens

    def may_produce(self, tokens: int = 1) -> bool:
        """Whether ``tokens`` more completion tokens stay within the credit window."""
        owed_after = self.owed_before + self.price.cost(
            self.prompt_tokens, self.completion_tokens + tokens
        )
        return owed_after - self.paid.sent <= self.credit

    # --- the job protocol's rules (the gate drives these) ------------------------------

    def exposure(self, completion_tokens: int) -> int:
        """What the channel owes once ``completion_tokens`` are out; the prompt counts
        from the start, since evaluating it is work done before the first token."""
        return self.owed_before + self.price.cost(self.prompt_tokens, completion_tokens)

    def owed_after(self, delivered: int) -> int:
        """Cumulative owed when the job ends after ``delivered`` completion tokens: a job
        that delivered none adds nothing (the client saw nothing)."""
        return self.owed_before if delivered == 0 else self.exposure(delivered)

    def billed(self, delivered: int) -> int:
        """The channel's cumulative owed to record when the job ends: what it owes, or
        what it paid if that is more (a client paying debt this side lost)."""
        return max(self.owed_after(delivered), self.paid.sent)

    @property
    def debt_settled(self) -> bool:
        return self.paid.sent >= self.owed_before

    def may_go_to(self, completion_tokens: int) -> bool:
        """Whether the job may have ``completion_tokens`` out: the debt is paid, the
        unpaid part stays within the window, and the deposit can still pay for it."""
        exposure = self.exposure(completion_tokens)
        return (
            self.debt_settled
            and exposure - self.paid.sent <= self.credit
            and exposure <= self.terms.deposit
        )

    def exhausted(self, completion_tokens: int) -> bool:
        """The deposit cannot pay for ``completion_tokens``: the job must end there."""
        return self.exposure(completion_tokens) > self.terms.deposit

    def ask(self, delivered: int, upto: int) -> int:
        """The payment to request so tokens up to ``upto`` may go out: everything
        delivered so far and the debt; more only when one chunk exceeds the window."""
        return max(self.owed_after(delivered), self.exposure(upto) - self.credit)

    def settled(self, delivered: int) -> bool:
        return self.paid.sent >= self.owed_after(delivered)

    def accept(self, voucher: Voucher, now: float) -> Accepted:
        """Accept ``voucher`` or raise VoucherRejected with the first rule it breaks."""
        state = voucher.state
        if state.channel_id != self.terms.channel_id:
            raise VoucherRejected(RejectReason.WRONG_CHANNEL, f"{state.channel_id:#x}")
        if state.seqno >= CONTRACT_SEQNO_LIMIT:
            raise VoucherRejected(RejectReason.SEQNO_BEYOND_CONTRACT, str(state.seqno))
        if state.seqno <= self.paid.seqno:
            raise VoucherRejected(
                RejectReason.SEQNO_NOT_RISING, f"{state.seqno} <= {self.paid.seqno}"
            )
        if state.sent < self.paid.sent:
            raise VoucherRejected(RejectReason.SENT_DECREASED, f"{state.sent} < {self.paid.sent}")
        if state.sent > self.terms.deposit:
            raise VoucherRejected(
                RejectReason.EXCEEDS_DEPOSIT, f"{state.sent} > {self.terms.deposit}"
            )
        if self.owed - state.sent > self.credit:
            raise VoucherRejected(
                RejectReason.UNDERPAID, f"owed {self.owed}, sent {state.sent}, credit {self.credit}"
            )
        # Signature last: the cheap checks above shed junk without a curve operation.
        try:
            voucher.verify(self.terms.client_public_key)
        except BadSignature as exc:
            raise VoucherRejected(RejectReason.BAD_SIGNATURE) from exc
        self.paid = Paid(seqno=state.seqno, sent=state.sent)
        return Accepted(voucher=voucher, accepted_at=now, owed=self.owed)


class ChannelExhausted(Exception):
    """Paying what is owed would exceed the deposit: the client must stop this job."""


class DebtDisputed(Exception):
    """The provider states more owed on the channel than this client can agree to."""


class ClientMeter:
    """Client side of one job: decides and signs the next voucher."""

    def __init__(
        self,
        channel_id: int,
        deposit: int,
        price: Price,
        credit_window_tokens: int,
        signer: VoucherSigner,
        *,
        owed_before: int = 0,
        paid: Paid = Paid(),  # frozen, so sharing the default is safe
    ) -> None:
        if credit_window_tokens < 0 or owed_before < 0:
            raise MeterError("credit window and owed_before cannot be negative")
        self.channel_id = channel_id
        self.deposit = deposit
        self.price = price
        self.credit_window_tokens = credit_window_tokens
        self._signer = signer
        self.owed_before = owed_before
        self.paid = paid
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def received_cost(self) -> int:
        """Cumulative nanoton owed for what this client has actually received."""
        return self.owed_before + self.price.cost(self.prompt_tokens, self.completion_tokens)

    @property
    def owed_now(self) -> int:
        """What this client owes on the channel right now: the channel's earlier cost,
        plus this job's prompt and tokens once a token arrived (none before)."""
        return self.owed_before if self.completion_tokens == 0 else self.received_cost

    @property
    def charge(self) -> int:
        """This job's share of the channel (what the client records for it): what it owes
        for the job, or what it paid during it if more (a prepaid prompt)."""
        return max(self.owed_now, self.paid.sent) - self.owed_before

    def adopt(self, claim: int, allowance: int) -> int:
        """Take the provider's ``owed_before`` if it is higher than ours by at most
        ``allowance`` (0 unless our last job there ended without a bill); the extra
        nanoton adopted. A lower claim changes nothing: we pay what we received."""
        extra = claim - self.owed_before
        if extra <= 0:
            return 0
        if extra > allowance:
            raise DebtDisputed(
                f"provider says {claim} nanoton are owed on the channel, this client "
                f"counts {self.owed_before} (allowance {allowance})"
            )
        self.owed_before = claim
        return extra

    @property
    def ceiling(self) -> int:
        """The most the client will ever sign for right now."""
        return self.received_cost + self.price.window_cost(self.credit_window_tokens)

    def received(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Record the cumulative counts from the provider's latest Tokens frame."""
        if prompt_tokens < self.prompt_tokens or completion_tokens < self.completion_tokens:
            raise MeterError("cumulative token counts cannot go backwards")
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens

    def pay(self, requested: int | None = None) -> Voucher | None:
        """The voucher answering a NeedPayment{owed=requested} (or a top-up to the ceiling).

        Pays ``min(requested, ceiling)``; returns None when that is nothing new.
        Raises ChannelExhausted when the amount would exceed the deposit.
        """
        target = self.ceiling if requested is None else min(max(requested, self.owed_now),
                                                             self.ceiling)
        return self._sign_up_to(target)

    def settle(self) -> Voucher | None:
        """The final voucher at job end: exactly what was received, nothing ahead."""
        return self._sign_up_to(self.owed_now)

    def _sign_up_to(self, target: int) -> Voucher | None:
        if target <= self.paid.sent:
            return None
        if target > self.deposit:
            raise ChannelExhausted(f"need {target} nanoton, deposit is {self.deposit}")
        seqno = self.paid.seqno + 1
        if seqno >= CONTRACT_SEQNO_LIMIT:
            raise ChannelExhausted("channel used up its seqnos; open a new one")
        voucher = self._signer.sign(VoucherState(self.channel_id, seqno, target))
        self.paid = Paid(seqno=seqno, sent=target)
        return voucher
