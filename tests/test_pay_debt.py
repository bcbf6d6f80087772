"""What bad payment behaviour gets: debt carried over, admission backed by the deposit,
fair places per channel, closed channels and squatted ids refused.

The provider's real gate and the client's real payer, without a model; the real
contract in the emulated chain; the channel protocol over libp2p hosts on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pay_net import (
    PRICE,
    PROVIDER_WALLET,
    TON,
    WINDOW_TOKENS,
    PayNet,
    channel_gate,
    linked,
    pay_net,
)
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell

from meshnode.jobs.payment_gate import PaymentGate, PaymentRejected
from meshnode.pay.channel.ledger import JobUsage
from meshnode.pay.channel.lifecycle import ClientChannel
from meshnode.pay.metering.gates import MAX_CHANNEL_PLACES
from meshnode.pay.metering.payer import ChannelPayer
from meshnode.pay.setup.wiring import ClientPayments

PROMPT_TOKENS = 2
STRANGER_WALLET = Address((0, bytes([0x5A]) * 32))


@pytest.fixture
def net(tmp_path: Path, code: Cell) -> PayNet:
    return pay_net(tmp_path, code)


@pytest.fixture
async def channel(net: PayNet) -> AsyncIterator[ClientChannel]:
    opened = await net.open_channel()
    async with linked(net) as (client_host, provider):
        await opened.announce(client_host, provider)
    yield opened


async def started(net: PayNet, channel: ClientChannel) -> PaymentGate:
    gate = channel_gate(net.provider.gates, channel)
    await gate.admit()
    await gate.start(prompt_tokens=PROMPT_TOKENS)
    return gate


async def abandon(net: PayNet, channel: ClientChannel) -> int:
    """A job whose client takes every token it may and never pays: tokens it got."""
    gate = await started(net, channel)
    delivered = 0
    while gate.may_produce(delivered + 1):
        delivered += 1
    await gate.finish()
    return delivered


async def paid_job(
    net: PayNet, channel: ClientChannel, tokens: int, *, unpaid_tail: int = 0
) -> ChannelPayer:
    """A job of ``tokens`` tokens, the client paying as asked; with ``unpaid_tail`` the
    stream breaks that many tokens after the last voucher (the client saw them)."""
    gate = await started(net, channel)
    payer = channel.payer(PRICE, WINDOW_TOKENS)
    payer.begin("hi")
    payer.accepted(PROMPT_TOKENS, gate.owed_before)
    delivered = 0
    while delivered < tokens:
        if not gate.may_produce(delivered + 1):
            owed = gate.ask(delivered, delivered + 1)
            await gate.accept_voucher(await payer.voucher_for(owed, delivered), delivered)
        delivered += 1
        assert gate.may_produce(delivered)
    while not gate.settled(delivered):
        owed = gate.ask(delivered, delivered)
        await gate.accept_voucher(await payer.voucher_for(owed, delivered), delivered)
    if unpaid_tail:
        assert gate.may_produce(delivered + unpaid_tail)
        delivered += unpaid_tail
    await gate.finish()
    await payer.finish(delivered, complete=not unpaid_tail)
    return payer


async def test_a_client_that_abandons_every_job_gets_one_window_free_per_channel_once(
    net: PayNet, channel: ClientChannel
) -> None:
    free = [await abandon(net, channel) for _ in range(5)]
    assert 0 < free[0] <= WINDOW_TOKENS
    assert free[1:] == [0, 0, 0, 0]  # nothing more, however many jobs it abandons


async def test_the_next_job_settles_the_debt_before_its_first_token(
    net: PayNet, channel: ClientChannel
) -> None:
    await paid_job(net, channel, 9, unpaid_tail=3)  # three tokens received, never paid
    ref = channel.ref
    debt = net.provider.ledger.channel_owed(ref) - channel.latest.sent  # type: ignore[union-attr]
    assert debt == PRICE.cost(0, 3) > 0
    owed = net.provider.ledger.channel_owed(ref)
    assert net.client.ledger.channel_owed(ref) == owed  # both sides count the same debt
    gate = await started(net, channel)
    assert not gate.may_produce(0)  # not even the prompt before the debt is paid
    payer = channel.payer(PRICE, WINDOW_TOKENS)
    payer.begin("hi")
    payer.accepted(PROMPT_TOKENS, gate.owed_before)
    await gate.accept_voucher(await payer.voucher_for(gate.ask(0, 1), 0), 0)
    stored = net.provider.ledger.latest_voucher(ref)
    assert stored is not None and stored.voucher.sent == owed  # the debt, first
    assert gate.may_produce(1)
    await gate.finish()


async def test_a_debt_the_client_never_ran_up_is_disputed(
    net: PayNet, channel: ClientChannel
) -> None:
    await paid_job(net, channel, 6)
    ref = channel.ref
    net.provider.ledger.record_usage(JobUsage("invented", ref, 0, 5, PRICE.cost(0, 5), 0.0))
    gate = await started(net, channel)
    payer = channel.payer(PRICE, WINDOW_TOKENS)
    payer.begin("hi")
    with pytest.raises(PaymentRejected) as info:
        payer.accepted(PROMPT_TOKENS, gate.owed_before)
    assert info.value.code == "debt_disputed"
    await gate.finish()


async def test_a_job_that_delivered_nothing_costs_nothing_on_either_side(
    net: PayNet, channel: ClientChannel
) -> None:
    gate = await started(net, channel)
    payer = channel.payer(PRICE, WINDOW_TOKENS)
    payer.begin("hi")
    payer.accepted(PROMPT_TOKENS, gate.owed_before)
    await gate.finish()  # the provider vanished before its first token
    await payer.finish(0, complete=False)
    assert payer.charged == 0
    ref = channel.ref
    assert net.provider.ledger.channel_owed(ref) == net.client.ledger.channel_owed(ref) == 0


async def test_a_one_nanoton_channel_buys_no_token(net: PayNet) -> None:
    tiny = await net.open_channel(deposit=1)
    async with linked(net) as (client_host, provider):
        await tiny.announce(client_host, provider)
    gate = channel_gate(net.provider.gates, tiny)
    with pytest.raises(PaymentRejected) as info:
        await gate.admit()  # before it could take any queue place
    assert info.value.code == "deposit_low"


async def test_one_channel_holds_at_most_its_own_places(
    net: PayNet, channel: ClientChannel
) -> None:
    held = [channel_gate(net.provider.gates, channel) for _ in range(MAX_CHANNEL_PLACES)]
    for gate in held:
        await gate.admit()
    extra = channel_gate(net.provider.gates, channel)
    with pytest.raises(PaymentRejected) as info:
        await extra.admit()  # refused at once: it never waits, never takes a queue place
    assert info.value.code == "channel_busy"
    await held[0].finish()
    await extra.admit()
    for gate in (*held[1:], extra):
        await gate.finish()


async def test_a_job_on_a_channel_whose_close_was_signed_is_refused(
    net: PayNet, channel: ClientChannel
) -> None:
    await paid_job(net, channel, 4)
    async with linked(net) as (client_host, provider):
        await channel.close(client_host, provider)
        with pytest.raises(Exception, match=r"not_open|channel_closed"):
            await channel.announce(client_host, provider)  # no coming back either
    gate = channel_gate(net.provider.gates, channel)
    with pytest.raises(PaymentRejected) as info:
        await gate.admit()
    assert info.value.code == "channel_closed"


async def test_a_stranger_announcing_the_same_channel_id_first_blocks_nobody(
    net: PayNet, channel: ClientChannel, tmp_path: Path, code: Cell
) -> None:
    net.chain.inner.add_wallet(STRANGER_WALLET, 10 * TON)
    stranger = ClientPayments.at(tmp_path / "stranger", net.chain, STRANGER_WALLET, code)
    squat = await ClientChannel.open(
        net.chain, STRANGER_WALLET, stranger.keys.channel_signer(), net.payee, TON,
        code=code, ledger=stranger.ledger, book=stranger.book,
        closing=channel.entry.config.closing, channel_id=channel.channel_id,
    )
    async with linked(net) as (client_host, provider):
        await squat.announce(client_host, provider)  # the same id, on chain, another key
        await channel.announce(client_host, provider)  # the owner is not refused
    assert squat.address != channel.address
    assert net.provider.ledger.channel(channel.ref) is not None
    assert net.provider.ledger.channel(squat.ref) is not None
    await paid_job(net, channel, 5)
    await paid_job(net, squat, 2)
    assert net.provider.ledger.latest_voucher(channel.ref) != net.provider.ledger.latest_voucher(
        squat.ref)


async def test_a_close_pays_the_debt_a_broken_job_left(
    net: PayNet, channel: ClientChannel
) -> None:
    await paid_job(net, channel, 6, unpaid_tail=2)  # the stream broke two tokens on
    latest = channel.latest
    assert latest is not None and latest.sent < channel.owed
    before = net.chain.balance(PROVIDER_WALLET)
    async with linked(net) as (client_host, provider):
        await channel.close(client_host, provider)
    assert net.chain.balance(PROVIDER_WALLET) - before == channel.owed
    assert channel.owed == net.provider.ledger.channel_owed(channel.ref)  # both counted it


async def test_a_job_on_a_channel_whose_uncooperative_close_began_on_chain_is_refused(
    net: PayNet, channel: ClientChannel
) -> None:
    await paid_job(net, channel, 4)
    await channel.start_uncooperative_close()  # on chain only: the provider is not asked
    await net.provider.watcher.check_once()  # the running node's next watch pass
    gate = channel_gate(net.provider.gates, channel)
    with pytest.raises(PaymentRejected) as info:
        await gate.admit()
    assert info.value.code == "channel_closed"
    assert net.provider.ledger.channel(channel.ref).state == "closing"  # type: ignore[union-attr]
