"""The official payment-channel contract, run in the TVM emulator, honours our vouchers.

Party A is the client (deposits, signs vouchers), party B the provider. The contract
code is the published one (hash-checked); fetch it once with
``python -m meshnode.pay.contract.code``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell

from meshnode.core.voucher import Voucher, VoucherSigner, VoucherState
from meshnode.pay.contract.cells import (
    CHANNEL_STATE_CLOSURE_STARTED,
    CHANNEL_STATE_OPEN,
    CHANNEL_STATE_UNINITED,
    FEE_RESERVE,
    ChannelConfig,
    ClosingConfig,
    CooperativeClose,
    challenge_quarantined_state_body,
    channel_address,
    channel_data,
    finish_uncooperative_close_body,
    init_channel_body,
    start_uncooperative_close_body,
    state_init,
    top_up_body,
)
from meshnode.pay.contract.code import ContractCodeError, load_payment_channel_code
from meshnode.pay.ton.emulator import EmulatedChain

TON = 10**9
DEPOSIT = 10 * TON
WALLET_FUNDS = 100 * TON
CHANNEL_ID = (1 << 120) + 0xBEEF
QUARANTINE_S = 3600
CONDITIONAL_CLOSE_S = 60
FINE = TON // 10
START = 1_700_000_000

CLIENT = VoucherSigner(bytes([1]) * 32)
PROVIDER = VoucherSigner(bytes([2]) * 32)
STRANGER = VoucherSigner(bytes([3]) * 32)
WALLET_A = Address((0, bytes([0xA]) * 32))
WALLET_B = Address((0, bytes([0xB]) * 32))


@dataclass
class Channel:
    chain: EmulatedChain
    address: Address

    def state(self) -> int:
        return self.chain.get_int(self.address, "get_channel_state")

    def voucher(self, seqno: int, sent: int) -> Voucher:
        return CLIENT.sign(VoucherState(CHANNEL_ID, seqno, sent))

    def provider_state(self) -> Voucher:
        """B pays nothing, so its own semi-channel stays at seqno 0, sent 0."""
        return PROVIDER.sign(VoucherState(CHANNEL_ID, 0, 0))


@pytest.fixture(scope="module")
def code() -> Cell:
    try:
        return load_payment_channel_code()
    except ContractCodeError as exc:
        pytest.fail(f"{exc} (the set-up step fetches it)")


def _deployed(code: Cell) -> tuple[EmulatedChain, Address, ChannelConfig]:
    chain = EmulatedChain(start_time=START)
    chain.add_wallet(WALLET_A, WALLET_FUNDS)
    chain.add_wallet(WALLET_B, WALLET_FUNDS)
    config = ChannelConfig(
        channel_id=CHANNEL_ID,
        key_a=CLIENT.public_key,
        key_b=PROVIDER.public_key,
        address_a=WALLET_A,
        address_b=WALLET_B,
        closing=ClosingConfig(QUARANTINE_S, FINE, CONDITIONAL_CLOSE_S),
    )
    address = channel_address(code, config)
    init = state_init(code, channel_data(config))
    result = chain.send(WALLET_A, address, DEPOSIT + FEE_RESERVE, top_up_body(DEPOSIT, 0), init)
    assert result.success, result
    return chain, address, config


@pytest.fixture
def channel(code: Cell) -> Channel:
    chain, address, _ = _deployed(code)
    init = init_channel_body(CHANNEL_ID, DEPOSIT, 0, is_a=True, signer=CLIENT)
    assert chain.send(WALLET_A, address, 0, init).success
    return Channel(chain, address)


def test_deposit_then_init_opens_the_channel(code: Cell) -> None:
    chain, address, _ = _deployed(code)
    assert chain.get_int(address, "get_channel_state") == CHANNEL_STATE_UNINITED
    assert chain.balance(address) == DEPOSIT + FEE_RESERVE
    init = init_channel_body(CHANNEL_ID, DEPOSIT, 0, is_a=True, signer=CLIENT)
    assert chain.send(WALLET_A, address, 0, init).success
    assert chain.get_int(address, "get_channel_state") == CHANNEL_STATE_OPEN


def test_one_message_deploys_funds_and_inits_the_channel(code: Cell) -> None:
    chain = EmulatedChain(start_time=START)
    chain.add_wallet(WALLET_A, WALLET_FUNDS)
    config = ChannelConfig(CHANNEL_ID, CLIENT.public_key, PROVIDER.public_key, WALLET_A,
                           WALLET_B, ClosingConfig(QUARANTINE_S, FINE, CONDITIONAL_CLOSE_S))
    address = channel_address(code, config)
    init = init_channel_body(CHANNEL_ID, DEPOSIT, 0, is_a=True, signer=CLIENT)
    # The contract counts the message's own value towards the balances init sets.
    result = chain.send(WALLET_A, address, DEPOSIT + FEE_RESERVE, init,
                        state_init(code, channel_data(config)))
    assert result.success, result
    assert chain.get_int(address, "get_channel_state") == CHANNEL_STATE_OPEN
    assert chain.balance(address) == DEPOSIT + FEE_RESERVE


def test_init_signer_sets_the_balances_so_the_client_must_init(code: Cell) -> None:
    # init_channel only requires balances >= the top-ups and < the contract balance:
    # a provider signing init could move the client's fee reserve to itself.
    chain, address, _ = _deployed(code)
    grab = init_channel_body(CHANNEL_ID, DEPOSIT, FEE_RESERVE - 1, is_a=False, signer=PROVIDER)
    assert chain.send(WALLET_B, address, 0, grab).success
    assert chain.get_int(address, "get_channel_state") == CHANNEL_STATE_OPEN


def test_init_claiming_more_than_the_contract_holds_is_refused(code: Cell) -> None:
    chain, address, _ = _deployed(code)
    init = init_channel_body(CHANNEL_ID, DEPOSIT + FEE_RESERVE, 0, is_a=True, signer=CLIENT)
    assert not chain.send(WALLET_A, address, 0, init).success
    assert chain.get_int(address, "get_channel_state") == CHANNEL_STATE_UNINITED


def test_top_up_after_init_is_refused_and_bounced(channel: Channel) -> None:
    before = channel.chain.balance(WALLET_A)
    result = channel.chain.send(WALLET_A, channel.address, TON, top_up_body(TON, 0))
    assert not result.success
    assert channel.chain.balance(WALLET_A) == before
    assert channel.chain.balance(channel.address) == DEPOSIT + FEE_RESERVE


def test_cooperative_close_pays_exactly_the_last_voucher(channel: Channel) -> None:
    chain = channel.chain
    last = channel.voucher(seqno=7, sent=3 * TON + 123)
    close = CooperativeClose.settling(last, DEPOSIT)
    a_before, b_before = chain.balance(WALLET_A), chain.balance(WALLET_B)
    body = close.body(close.sign(CLIENT), close.sign(PROVIDER))
    result = chain.send(WALLET_B, channel.address, 0, body)
    assert result.success, result
    assert chain.balance(WALLET_B) - b_before == last.sent
    assert chain.balance(WALLET_A) - a_before == DEPOSIT - last.sent + FEE_RESERVE
    assert chain.balance(channel.address) == 0
    assert channel.state() == CHANNEL_STATE_UNINITED


def test_cooperative_close_needs_both_signatures(channel: Channel) -> None:
    close = CooperativeClose.settling(channel.voucher(2, TON), DEPOSIT)
    forged = close.body(close.sign(PROVIDER), close.sign(PROVIDER))
    assert not channel.chain.send(WALLET_B, channel.address, 0, forged).success
    assert channel.state() == CHANNEL_STATE_OPEN


def test_forged_voucher_is_refused_by_the_contract(channel: Channel) -> None:
    forged = STRANGER.sign(VoucherState(CHANNEL_ID, 9, 9 * TON))
    body = start_uncooperative_close_body(
        CHANNEL_ID, forged, channel.provider_state(), is_a=False, signer=PROVIDER
    )
    assert not channel.chain.send(WALLET_B, channel.address, 0, body).success
    assert channel.state() == CHANNEL_STATE_OPEN


def test_voucher_for_another_channel_is_refused_by_the_contract(channel: Channel) -> None:
    other = CLIENT.sign(VoucherState(CHANNEL_ID + 1, 9, TON))
    body = start_uncooperative_close_body(
        CHANNEL_ID, other, channel.provider_state(), is_a=False, signer=PROVIDER
    )
    assert not channel.chain.send(WALLET_B, channel.address, 0, body).success
    assert channel.state() == CHANNEL_STATE_OPEN


def test_uncooperative_close_with_the_latest_voucher_pays_it(channel: Channel) -> None:
    chain = channel.chain
    latest = channel.voucher(seqno=4, sent=2 * TON)
    start = start_uncooperative_close_body(
        CHANNEL_ID, latest, channel.provider_state(), is_a=False, signer=PROVIDER
    )
    assert chain.send(WALLET_B, channel.address, 0, start).success
    assert channel.state() == CHANNEL_STATE_CLOSURE_STARTED
    early = chain.send(WALLET_B, channel.address, 0, finish_uncooperative_close_body())
    assert not early.success  # still in quarantine
    chain.advance(QUARANTINE_S + CONDITIONAL_CLOSE_S + 1)
    b_before = chain.balance(WALLET_B)
    assert chain.send(WALLET_B, channel.address, 0, finish_uncooperative_close_body()).success
    assert chain.balance(WALLET_B) - b_before == latest.sent
    assert chain.balance(channel.address) == 0


def test_stale_voucher_is_challenged_and_the_cheater_fined(channel: Channel) -> None:
    chain = channel.chain
    stale = channel.voucher(seqno=1, sent=TON)
    latest = channel.voucher(seqno=5, sent=4 * TON)
    # The client tries to close on an old, cheaper state...
    start = start_uncooperative_close_body(
        CHANNEL_ID, stale, channel.provider_state(), is_a=True, signer=CLIENT
    )
    assert chain.send(WALLET_A, channel.address, 0, start).success
    # ...and the provider answers inside the quarantine with the newest one.
    chain.advance(QUARANTINE_S // 2)
    challenge = challenge_quarantined_state_body(
        CHANNEL_ID, latest, channel.provider_state(), is_a=False, signer=PROVIDER
    )
    assert chain.send(WALLET_B, channel.address, 0, challenge).success
    chain.advance(QUARANTINE_S + CONDITIONAL_CLOSE_S)
    a_before, b_before = chain.balance(WALLET_A), chain.balance(WALLET_B)
    assert chain.send(WALLET_B, channel.address, 0, finish_uncooperative_close_body()).success
    assert chain.balance(WALLET_B) - b_before == latest.sent + FINE
    assert chain.balance(WALLET_A) - a_before == DEPOSIT - latest.sent - FINE + FEE_RESERVE


def test_challenge_with_an_older_state_does_not_lower_the_payout(channel: Channel) -> None:
    chain = channel.chain
    latest = channel.voucher(5, 4 * TON)
    start = start_uncooperative_close_body(
        CHANNEL_ID, latest, channel.provider_state(), is_a=False, signer=PROVIDER
    )
    assert chain.send(WALLET_B, channel.address, 0, start).success
    challenge = challenge_quarantined_state_body(
        CHANNEL_ID, channel.voucher(2, TON), channel.provider_state(), is_a=True, signer=CLIENT
    )
    chain.send(WALLET_A, channel.address, 0, challenge)
    chain.advance(QUARANTINE_S + CONDITIONAL_CLOSE_S + 1)
    b_before = chain.balance(WALLET_B)
    assert chain.send(WALLET_B, channel.address, 0, finish_uncooperative_close_body()).success
    assert chain.balance(WALLET_B) - b_before == latest.sent


def test_voucher_above_the_deposit_leaves_the_close_stuck(channel: Channel) -> None:
    # Why the provider meter refuses sent > deposit: the contract accepts such a state
    # into quarantine but can then never pay it out.
    chain = channel.chain
    overdrawn = channel.voucher(seqno=3, sent=DEPOSIT + TON)
    start = start_uncooperative_close_body(
        CHANNEL_ID, overdrawn, channel.provider_state(), is_a=False, signer=PROVIDER
    )
    assert chain.send(WALLET_B, channel.address, 0, start).success
    chain.advance(QUARANTINE_S + CONDITIONAL_CLOSE_S + 1)
    assert not chain.send(WALLET_B, channel.address, 0, finish_uncooperative_close_body()).success
    assert chain.balance(channel.address) == DEPOSIT + FEE_RESERVE
