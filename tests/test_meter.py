"""Metering rules: what a provider accepts and what a client is willing to sign."""

from __future__ import annotations

import pytest

from meshnode.core.meter import (
    CONTRACT_SEQNO_LIMIT,
    ChannelExhausted,
    ChannelTerms,
    ClientMeter,
    DebtDisputed,
    MeterError,
    Paid,
    Price,
    ProviderMeter,
    RejectReason,
    VoucherRejected,
    admits,
)
from meshnode.core.voucher import Voucher, VoucherSigner, VoucherState

CLIENT = VoucherSigner(bytes(range(32)))
STRANGER = VoucherSigner(bytes(range(100, 132)))
CHANNEL = 0xC0FFEE
DEPOSIT = 1_000_000
PRICE = Price(prompt_per_1k=1_000, completion_per_1k=2_000)  # 1 and 2 nanoton per token
WINDOW = 50  # tokens, worth 100 nanoton at the completion price
NOW = 1_700_000_000.0


def _provider(**kwargs: object) -> ProviderMeter:
    terms = ChannelTerms(CHANNEL, CLIENT.public_key, DEPOSIT)
    return ProviderMeter(terms, PRICE, WINDOW, **kwargs)  # type: ignore[arg-type]


def _voucher(seqno: int, sent: int, signer: VoucherSigner = CLIENT) -> Voucher:
    return signer.sign(VoucherState(CHANNEL, seqno, sent))


def _reason(meter: ProviderMeter, voucher: Voucher) -> RejectReason:
    with pytest.raises(VoucherRejected) as info:
        meter.accept(voucher, NOW)
    return info.value.reason


# --- prices ---------------------------------------------------------------------------


def test_cost_is_priced_per_thousand_tokens() -> None:
    assert Price(3_000, 5_000).cost(2_000, 1_000) == 3_000 * 2 + 5_000


def test_cost_rounds_up_so_the_provider_is_never_short() -> None:
    assert Price(1, 1).cost(1, 0) == 1
    assert Price(1, 1).cost(1_000, 0) == 1


def test_negative_prices_are_refused() -> None:
    with pytest.raises(MeterError):
        Price(-1, 0)


# --- provider: credit window ----------------------------------------------------------


def test_provider_may_run_ahead_by_the_credit_window() -> None:
    meter = _provider()
    assert meter.may_produce(WINDOW)
    assert not meter.may_produce(WINDOW + 1)


def test_payment_reopens_the_credit_window() -> None:
    meter = _provider()
    meter.record_completion(WINDOW)
    assert not meter.may_produce(1)
    meter.accept(_voucher(1, PRICE.cost(0, WINDOW)), NOW)
    assert meter.may_produce(WINDOW)


def test_prompt_tokens_count_against_the_window() -> None:
    meter = _provider()
    meter.record_prompt(WINDOW * 2)  # costs exactly the window at half price
    assert not meter.may_produce(1)


def test_owed_includes_earlier_jobs_on_the_channel() -> None:
    meter = _provider(owed_before=500, paid=Paid(seqno=4, sent=500))
    meter.record_completion(10)
    assert meter.owed == 500 + 20
    assert meter.unpaid == 20


# --- provider: accepting vouchers -----------------------------------------------------


def test_accepted_voucher_becomes_the_paid_state() -> None:
    meter = _provider()
    meter.record_completion(10)
    accepted = meter.accept(_voucher(1, 20), NOW)
    assert meter.paid == Paid(seqno=1, sent=20)
    assert (accepted.accepted_at, accepted.owed) == (NOW, 20)


def test_voucher_for_another_channel_is_rejected() -> None:
    other = CLIENT.sign(VoucherState(CHANNEL + 1, 1, 10))
    assert _reason(_provider(), other) is RejectReason.WRONG_CHANNEL


def test_voucher_signed_by_a_stranger_is_rejected() -> None:
    assert _reason(_provider(), _voucher(1, 10, STRANGER)) is RejectReason.BAD_SIGNATURE


def test_replayed_seqno_is_rejected() -> None:
    meter = _provider()
    meter.accept(_voucher(1, 10), NOW)
    assert _reason(meter, _voucher(1, 20)) is RejectReason.SEQNO_NOT_RISING


def test_seqno_beyond_the_contract_uint32_is_rejected() -> None:
    meter = _provider()
    assert _reason(meter, _voucher(CONTRACT_SEQNO_LIMIT, 10)) is RejectReason.SEQNO_BEYOND_CONTRACT


def test_cumulative_amount_may_not_go_down() -> None:
    meter = _provider()
    meter.accept(_voucher(1, 50), NOW)
    assert _reason(meter, _voucher(2, 49)) is RejectReason.SENT_DECREASED


def test_voucher_above_the_deposit_is_rejected() -> None:
    assert _reason(_provider(), _voucher(1, DEPOSIT + 1)) is RejectReason.EXCEEDS_DEPOSIT


def test_voucher_leaving_more_than_the_window_unpaid_is_rejected() -> None:
    meter = _provider()
    meter.record_completion(WINDOW * 3)  # owes 300, window worth 100
    assert _reason(meter, _voucher(1, 199)) is RejectReason.UNDERPAID
    meter.accept(_voucher(1, 200), NOW)


def test_rejected_voucher_leaves_the_paid_state_unchanged() -> None:
    meter = _provider()
    meter.accept(_voucher(1, 10), NOW)
    _reason(meter, _voucher(2, 20, STRANGER))
    assert meter.paid == Paid(seqno=1, sent=10)


# --- client ---------------------------------------------------------------------------


def _client(**kwargs: object) -> ClientMeter:
    return ClientMeter(CHANNEL, DEPOSIT, PRICE, WINDOW, CLIENT, **kwargs)  # type: ignore[arg-type]


def test_client_pays_what_the_provider_asks_within_its_ceiling() -> None:
    client = _client()
    client.received(prompt_tokens=10, completion_tokens=20)  # worth 50 nanoton
    voucher = client.pay(requested=70)
    assert voucher is not None
    assert (voucher.seqno, voucher.sent) == (1, 70)
    voucher.verify(CLIENT.public_key)


def test_client_pays_what_it_received_even_when_asked_for_less() -> None:
    client = _client()
    client.received(prompt_tokens=10, completion_tokens=20)
    voucher = client.pay(requested=30)  # a provider that lost count of its own tokens
    assert voucher is not None and voucher.sent == PRICE.cost(10, 20)


def test_client_never_signs_beyond_received_plus_window() -> None:
    client = _client()
    client.received(prompt_tokens=0, completion_tokens=10)
    voucher = client.pay(requested=10**9)
    assert voucher is not None
    assert voucher.sent == PRICE.cost(0, 10) + PRICE.window_cost(WINDOW)


def test_client_signs_nothing_when_already_paid() -> None:
    client = _client()
    client.received(0, 10)
    assert client.pay(requested=20) is not None
    assert client.pay(requested=20) is None


def test_settle_pays_exactly_what_was_received() -> None:
    client = _client(owed_before=100, paid=Paid(seqno=7, sent=100))
    client.received(prompt_tokens=3, completion_tokens=4)
    voucher = client.settle()
    assert voucher is not None
    assert (voucher.seqno, voucher.sent) == (8, 100 + PRICE.cost(3, 4))


def test_client_refuses_to_exceed_the_deposit() -> None:
    client = ClientMeter(CHANNEL, 10, PRICE, WINDOW, CLIENT)
    client.received(0, 100)
    with pytest.raises(ChannelExhausted):
        client.settle()


def test_client_counts_cannot_go_backwards() -> None:
    client = _client()
    client.received(5, 5)
    with pytest.raises(MeterError):
        client.received(5, 4)


def test_client_vouchers_are_accepted_by_the_provider_meter() -> None:
    provider, client = _provider(), _client()
    provider.record_prompt(12)
    client.received(12, 0)
    for step in range(1, 6):
        provider.record_completion(30)
        client.received(12, 30 * step)
        voucher = client.pay(requested=provider.owed)
        assert voucher is not None
        provider.accept(voucher, NOW + step)
    final = client.settle()
    if final is not None:
        provider.accept(final, NOW + 10)
    assert provider.paid.sent == provider.owed == client.received_cost


# --- debt -----------------------------------------------------------------------------


def test_a_channel_is_admitted_only_while_its_deposit_covers_the_debt_and_a_window() -> None:
    credit = PRICE.window_cost(WINDOW)
    assert admits(DEPOSIT, DEPOSIT - credit, credit)
    assert not admits(DEPOSIT, DEPOSIT - credit + 1, credit)
    assert not admits(1, 0, credit)  # a one-nanoton channel buys no window at all


def test_the_debt_is_paid_before_the_next_jobs_first_token() -> None:
    meter = _provider(owed_before=300, paid=Paid(seqno=3, sent=250))
    meter.record_prompt(5)
    assert not meter.may_go_to(0)
    assert meter.ask(0, 1) == 300  # the debt, not the prompt (that is within the window)
    meter.accept(_voucher(4, 300), NOW)
    assert meter.may_go_to(1)


def test_a_job_that_delivered_nothing_adds_nothing_to_the_channel() -> None:
    meter = _provider(owed_before=300, paid=Paid(seqno=3, sent=300))
    meter.record_prompt(40)
    assert meter.billed(0) == 300
    assert meter.billed(2) == 300 + PRICE.cost(40, 2)


def test_the_provider_asks_for_what_it_delivered_not_ahead() -> None:
    meter = _provider()
    meter.record_prompt(10)
    assert meter.ask(20, 21) == PRICE.cost(10, 20)


def test_the_deposit_bounds_the_job_however_much_is_paid() -> None:
    terms = ChannelTerms(CHANNEL, CLIENT.public_key, 100)
    meter = ProviderMeter(terms, PRICE, WINDOW)
    assert meter.may_go_to(50) and not meter.may_go_to(51)
    assert meter.exhausted(51)


def test_the_client_adopts_a_higher_debt_only_within_its_allowance() -> None:
    client = _client(owed_before=100, paid=Paid(seqno=2, sent=90))
    assert client.adopt(90, allowance=0) == 0  # lower: the client pays what it counts
    with pytest.raises(DebtDisputed):
        client.adopt(150, allowance=0)
    assert client.adopt(150, allowance=60) == 50
    assert client.owed_now == 150
