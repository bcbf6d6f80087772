"""A payment channel's life: open on chain, announce, pay by vouchers, close.

The real contract runs in the emulated chain; client and provider talk over real libp2p
hosts on 127.0.0.1 where the test is about the channel protocol. Vouchers are driven
through the provider's real gate and the client's real payer, without a model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from pay_net import (
    CLIENT_WALLET,
    DEPOSIT,
    FINE,
    PRICE,
    PROVIDER_WALLET,
    QUARANTINE_S,
    WINDOW_TOKENS,
    PayNet,
    channel_gate,
    linked,
    pay_net,
)
from pytoniq_core.boc.cell import Cell

from meshnode.core.voucher import VoucherState
from meshnode.pay.channel.ledger import ChannelRef
from meshnode.pay.channel.lifecycle import ChannelError, ClientChannel, WatchAction
from meshnode.pay.channel.protocol import Announce
from meshnode.pay.channel.service import ChannelRefused
from meshnode.pay.contract.cells import (
    CHANNEL_STATE_CLOSURE_STARTED,
    CHANNEL_STATE_UNINITED,
    FEE_RESERVE,
)
from meshnode.pay.metering.payer import ChannelPayer
from meshnode.pay.ton.onchain import raw_address

TOKENS_PER_VOUCHER = 3


@pytest.fixture
def net(tmp_path: Path, code: Cell) -> PayNet:
    return pay_net(tmp_path, code)


async def pay_in_steps(net: PayNet, channel: ClientChannel, steps: int) -> ChannelPayer:
    """One job of ``steps`` payment rounds through the provider's gate and client's payer."""
    gate = channel_gate(net.provider.gates, channel)
    payer = channel.payer(PRICE, WINDOW_TOKENS)
    payer.begin("hi")
    await gate.admit()
    await gate.start(prompt_tokens=2)
    payer.accepted(2, gate.owed_before)
    delivered = 0
    for _ in range(steps):
        delivered += TOKENS_PER_VOUCHER
        await gate.accept_voucher(
            await payer.voucher_for(gate.ask(delivered, delivered), delivered), delivered
        )
    assert gate.settled(delivered)
    await gate.finish()
    await payer.finish(delivered, complete=True)
    return payer


async def test_open_deploys_the_deposit_and_inits_the_channel(net: PayNet) -> None:
    channel = await net.open_channel()
    status = await channel.status()
    assert status.is_open
    assert (status.balance_a, status.balance_b) == (DEPOSIT, 0)
    assert net.chain.balance(channel.address) == DEPOSIT + FEE_RESERVE


async def test_provider_learns_an_announced_channel_from_the_chain(net: PayNet) -> None:
    channel = await net.open_channel()
    async with linked(net) as (client_host, provider):
        await channel.announce(client_host, provider)
    record = net.provider.ledger.channel(channel.ref)
    assert record is not None
    assert (record.client_key, record.deposit) == (channel.signer.public_key, DEPOSIT)
    assert channel.entry.counter_state is not None  # kept for a unilateral close


async def test_announce_of_a_channel_that_is_not_on_chain_is_refused(net: PayNet) -> None:
    never_deployed = Announce(
        channel_id=77,
        key_a=net.client.keys.channel_public,
        address_a=raw_address(CLIENT_WALLET),
        quarantine_duration=QUARANTINE_S,
        misbehavior_fine=FINE,
        conditional_close_duration=60,
        excess_fee=0,
    )
    with pytest.raises(ChannelRefused) as info:
        await net.provider.service.learn(never_deployed)
    assert info.value.code == "not_on_chain"
    assert net.provider.ledger.channel(ChannelRef(77, net.client.keys.channel_public)) is None


async def test_a_quarantine_too_short_to_challenge_in_is_refused(net: PayNet) -> None:
    channel = await net.open_channel()
    config = channel.entry.config
    hasty = Announce(
        channel_id=config.channel_id,
        key_a=config.key_a,
        address_a=raw_address(CLIENT_WALLET),
        quarantine_duration=60,
        misbehavior_fine=FINE,
        conditional_close_duration=60,
        excess_fee=0,
    )
    with pytest.raises(ChannelRefused) as info:
        await net.provider.service.learn(hasty)
    assert info.value.code == "quarantine_too_short"


async def test_every_accepted_voucher_is_in_the_ledger_when_accept_returns(net: PayNet) -> None:
    channel = await net.open_channel()
    async with linked(net) as (client_host, provider):
        await channel.announce(client_host, provider)
    gate = channel_gate(net.provider.gates, channel)
    payer = channel.payer(PRICE, WINDOW_TOKENS)
    payer.begin("hi")
    await gate.admit()
    await gate.start(prompt_tokens=2)
    payer.accepted(2, gate.owed_before)
    for delivered in (3, 6, 9):
        await gate.accept_voucher(
            await payer.voucher_for(gate.ask(delivered, delivered), delivered), delivered
        )
        stored = net.provider.ledger.latest_voucher(channel.ref)
        assert stored is not None and stored.voucher == payer.vouchers[-1]
    await gate.finish()


async def test_cooperative_close_pays_exactly_the_last_voucher(net: PayNet) -> None:
    channel = await net.open_channel()
    async with linked(net) as (client_host, provider):
        await channel.announce(client_host, provider)
        payer = await pay_in_steps(net, channel, steps=4)
        last = payer.vouchers[-1]
        a_before = net.chain.balance(CLIENT_WALLET)
        b_before = net.chain.balance(PROVIDER_WALLET)
        await channel.close(client_host, provider)
    assert last.sent > 0
    assert net.chain.balance(PROVIDER_WALLET) - b_before == last.sent
    assert net.chain.balance(CLIENT_WALLET) - a_before == DEPOSIT - last.sent + FEE_RESERVE
    assert net.chain.balance(channel.address) == 0
    assert (await channel.status()).state == CHANNEL_STATE_UNINITED


async def test_provider_will_not_cosign_a_close_below_its_latest_voucher(net: PayNet) -> None:
    channel = await net.open_channel()
    async with linked(net) as (client_host, provider):
        await channel.announce(client_host, provider)
        payer = await pay_in_steps(net, channel, steps=3)
        channel.latest = payer.vouchers[0]  # a client pretending it paid (and owes) less
        channel.owed = payer.vouchers[0].sent
        with pytest.raises(ChannelError) as info:
            await channel.close(client_host, provider)
    assert info.value.code == "stale_voucher"
    assert (await channel.status()).is_open


async def test_watcher_challenges_a_stale_close_and_the_client_is_fined(net: PayNet) -> None:
    channel = await net.open_channel()
    async with linked(net) as (client_host, provider):
        await channel.announce(client_host, provider)
    payer = await pay_in_steps(net, channel, steps=4)
    stale, latest = payer.vouchers[0], payer.vouchers[-1]
    assert stale.seqno < latest.seqno and stale.sent < latest.sent
    watcher = net.provider.watcher
    watcher.interval_s = 0.01
    await channel.start_uncooperative_close(stale)
    assert (await channel.status()).quarantine_seqno_a == stale.seqno
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        with trio.fail_after(10):
            while not watcher.actions:
                await trio.sleep(0.01)
        assert watcher.actions == [WatchAction(channel.channel_id, "challenged")]
        assert (await channel.status()).quarantine_seqno_a == latest.seqno
        a_before = net.chain.balance(CLIENT_WALLET)
        b_before = net.chain.balance(PROVIDER_WALLET)
        net.chain.inner.advance(QUARANTINE_S + 61)  # quarantine and settling time are over
        with trio.fail_after(10):
            while len(watcher.actions) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert watcher.actions[1] == WatchAction(channel.channel_id, "finished")
    assert net.chain.balance(PROVIDER_WALLET) - b_before == latest.sent + FINE
    assert net.chain.balance(CLIENT_WALLET) - a_before == DEPOSIT - latest.sent - FINE + FEE_RESERVE


async def test_watcher_leaves_a_close_with_the_latest_voucher_alone(net: PayNet) -> None:
    channel = await net.open_channel()
    async with linked(net) as (client_host, provider):
        await channel.announce(client_host, provider)
    await pay_in_steps(net, channel, steps=2)
    await channel.start_uncooperative_close()
    assert await net.provider.watcher.check_once() == []
    assert (await channel.status()).state == CHANNEL_STATE_CLOSURE_STARTED


async def test_a_provider_withdraws_the_latest_voucher_from_a_client_that_stays_away(
    net: PayNet,
) -> None:
    channel = await net.open_channel()
    async with linked(net) as (client_host, provider):
        await channel.announce(client_host, provider)
    latest = (await pay_in_steps(net, channel, steps=3)).vouchers[-1]
    watcher = net.provider.watcher
    a_before = net.chain.balance(CLIENT_WALLET)
    b_before = net.chain.balance(PROVIDER_WALLET)
    assert await watcher.start_close(channel.ref) == latest.sent  # the client is not asked
    assert (await channel.status()).state == CHANNEL_STATE_CLOSURE_STARTED
    assert not net.provider.ledger.channel(channel.ref).is_open  # type: ignore[union-attr]
    assert await watcher.check_once() == []  # in quarantine: nothing to do yet
    net.chain.inner.advance(QUARANTINE_S + 61)  # quarantine and settling time are over
    assert await watcher.check_once() == [WatchAction(channel.channel_id, "finished")]
    assert net.chain.balance(PROVIDER_WALLET) - b_before == latest.sent
    assert net.chain.balance(CLIENT_WALLET) - a_before == DEPOSIT - latest.sent + FEE_RESERVE


async def test_a_provider_cannot_withdraw_from_a_channel_that_never_paid(net: PayNet) -> None:
    channel = await net.open_channel()
    async with linked(net) as (client_host, provider):
        await channel.announce(client_host, provider)
    with pytest.raises(ChannelError, match="no_voucher"):
        await net.provider.watcher.start_close(channel.ref)
    with pytest.raises(ChannelError, match="unknown_channel"):
        await net.provider.watcher.start_close(ChannelRef(channel.channel_id, bytes(32)))
    assert net.chain.sends == 1  # nothing was sent


@pytest.mark.parametrize("jobs, steps", [(1, 1), (5, 12)])
async def test_a_channel_costs_two_chain_messages_whatever_it_carries(
    net: PayNet, jobs: int, steps: int
) -> None:
    channel = await net.open_channel()
    async with linked(net) as (client_host, provider):
        await channel.announce(client_host, provider)
        vouchers = 0
        for _ in range(jobs):
            vouchers += len((await pay_in_steps(net, channel, steps)).vouchers)
        await channel.close(client_host, provider)
    assert vouchers == jobs * steps
    assert net.chain.sends == 2  # one message opens (deploy, deposit, init), one closes


async def test_a_zero_voucher_closes_a_channel_that_never_carried_a_job(net: PayNet) -> None:
    channel = await net.open_channel()
    async with linked(net) as (client_host, provider):
        await channel.announce(client_host, provider)
        a_before = net.chain.balance(CLIENT_WALLET)
        await channel.close(client_host, provider)
    assert net.chain.balance(CLIENT_WALLET) - a_before == DEPOSIT + FEE_RESERVE
    assert channel.latest is not None and channel.latest.state == VoucherState(
        channel.channel_id, 1, 0
    )
