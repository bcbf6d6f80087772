"""Routed jobs pay: the light client opens a channel to a priced provider on first use,
within its budget, reuses it, and pays each provider exactly for the tokens it
delivered, across failover and restarts. Real providers on 127.0.0.1 (tiny llama
model), the real contract in the emulated chain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from pay_net import CLIENT_WALLET, START, TON, CountingChain
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell

from meshnode.core.advert import TonPayee
from meshnode.core.meter import Price
from meshnode.core.router import Strategy
from meshnode.identity import NodeIdentity
from meshnode.jobs.routed import NoProvider
from meshnode.node import ClientNode, ProviderNode, ProviderSettings, client_node, provider_node
from meshnode.pay.channel.ledger import ChannelRef
from meshnode.pay.channel.pool import Budget, ClientChannels, job_need
from meshnode.pay.setup.wiring import ClientPayments, ProviderPayments
from meshnode.pay.ton.emulator import EmulatedChain
from meshnode.pay.ton.onchain import raw_address

if TYPE_CHECKING:
    from meshnode.engine.llama import LlamaEngine

pytestmark = pytest.mark.slow

WINDOW = 8
LONG_CTX = 4096  # a long generation cannot finish before its provider is stopped
CHEAP = Price(prompt_per_1k=1_000_000, completion_per_1k=2_000_000)
DEAR = Price(prompt_per_1k=2_000_000, completion_per_1k=5_000_000)
PROVIDER_WALLETS = [Address((0, bytes([0xB0 + i]) * 32)) for i in range(3)]


@pytest.fixture
async def engines(tiny_gguf_path: Path) -> AsyncIterator[list[LlamaEngine]]:
    from meshnode.engine.llama import LlamaEngine

    engines = [await LlamaEngine.load(tiny_gguf_path, n_ctx=LONG_CTX) for _ in range(2)]
    yield engines
    for e in engines:
        await e.aclose()


def steady(engine: LlamaEngine) -> dict[str, Any]:
    from meshnode.engine.llama import steady_logit_bias

    return {"temperature": 0.0, "logit_bias": steady_logit_bias(engine)}


@dataclass
class Market:
    chain: CountingChain
    code: Cell
    tmp: Path

    def provider_payments(self, i: int, price: Price) -> ProviderPayments:
        return ProviderPayments.at(self.tmp / f"provider{i}", self.chain, PROVIDER_WALLETS[i],
                                   price, WINDOW, self.code)

    def client_payments(self) -> ClientPayments:
        return ClientPayments.at(self.tmp / "client", self.chain, CLIENT_WALLET, self.code)

    def wallet(self, i: int) -> int:
        return self.chain.balance(PROVIDER_WALLETS[i])


@pytest.fixture
def market(tmp_path: Path, code: Cell) -> Market:
    emulated = EmulatedChain(start_time=START)
    emulated.add_wallet(CLIENT_WALLET, 100 * TON)
    for wallet in PROVIDER_WALLETS:
        emulated.add_wallet(wallet, TON)
    return Market(CountingChain(emulated), code, tmp_path)


@asynccontextmanager
async def priced(
    engine: LlamaEngine, pay: ProviderPayments, price: Price, identity: NodeIdentity
) -> AsyncIterator[ProviderNode]:
    settings = ProviderSettings(
        price_prompt_per_1k=price.prompt_per_1k,
        price_completion_per_1k=price.completion_per_1k,
    )
    async with provider_node(engine, identity=identity, settings=settings,
                             payments=pay) as node:
        assert node.advert().ton == TonPayee(
            pay.keys.channel_public, raw_address(pay.service.wallet), WINDOW)
        yield node


@asynccontextmanager
async def paying_client(
    market: Market, budget: Budget, strategy: Strategy = Strategy.POWER_OF_TWO
) -> AsyncIterator[tuple[ClientNode, ClientChannels]]:
    channels = ClientChannels(market.client_payments(), budget)
    async with client_node(allow_insecure=True, payments=channels, strategy=strategy) as c:
        yield c, channels


def channel_of(channels: ClientChannels, provider: ProviderPayments) -> ChannelRef:
    [channel] = [c for c in channels.channels
                 if c.entry.config.key_b == provider.keys.channel_public]
    return channel.ref


async def test_a_routed_job_opens_a_channel_on_first_use_and_later_jobs_reuse_it(
    market: Market, engines: list[LlamaEngine]
) -> None:
    pay = market.provider_payments(0, CHEAP)
    before = market.wallet(0)
    async with (
        priced(engines[0], pay, CHEAP, NodeIdentity.generate()) as prov,
        paying_client(market, Budget(deposit=TON // 10, total=TON)) as (client, channels),
    ):
        await client.connect(prov.addrs[0])
        costs = []
        for prompt in ("one", "two", "three"):
            res = await client.complete(engines[0].info.model_id, prompt, max_tokens=12,
                                        params=steady(engines[0]))
            assert res.usage.completion_tokens == 12
            costs.append(res.usage.cost_nanoton)
        assert channels.opened == 1
        assert market.chain.sends == 1  # deploy + deposit + init in one message, once
        ref = channel_of(channels, pay)
        [channel] = channels.channels
        stored = pay.ledger.latest_voucher(ref)
        assert stored is not None and stored.voucher == channel.latest
        assert stored.voucher.sent == sum(costs) == pay.ledger.channel_owed(ref)
        assert await channels.close_all() == [ref.channel_id]
    assert market.wallet(0) - before == sum(costs)
    assert costs == [CHEAP.cost(j.prompt_tokens, j.completion_tokens)
                     for j in pay.ledger.jobs(ref)]


async def test_a_restarted_client_reuses_its_channel(
    market: Market, engines: list[LlamaEngine]
) -> None:
    pay = market.provider_payments(0, CHEAP)
    async with priced(engines[0], pay, CHEAP, NodeIdentity.generate()) as prov:
        for _ in range(2):
            async with paying_client(market, Budget()) as (client, channels):
                await client.connect(prov.addrs[0])
                await client.complete(engines[0].info.model_id, "hi", max_tokens=4,
                                      params=steady(engines[0]))
        assert channels.opened == 0 and len(channels.channels) == 1
    assert market.chain.sends == 1


async def test_a_provider_the_client_cannot_afford_is_skipped_not_tried(
    market: Market, engines: list[LlamaEngine]
) -> None:
    pay = market.provider_payments(0, DEAR)
    tiny = Budget(deposit=DEAR.cost(0, 40), total=TON)  # less than one 64-token job
    async with (
        priced(engines[0], pay, DEAR, NodeIdentity.generate()) as prov,
        paying_client(market, tiny) as (client, _channels),
    ):
        await client.connect(prov.addrs[0])
        with pytest.raises(NoProvider, match="affordable: 0"):
            await client.complete(engines[0].info.model_id, "hi", max_tokens=64)
        res = await client.complete(engines[0].info.model_id, "hi", max_tokens=4,
                                    params=steady(engines[0]))  # this one fits
        assert res.usage.completion_tokens == 4
    assert prov.jobs.stats.jobs_started == 1


async def test_the_total_budget_bounds_the_channels_opened(
    market: Market, engines: list[LlamaEngine]
) -> None:
    pays = [market.provider_payments(i, CHEAP) for i in range(2)]
    budget = Budget(deposit=TON // 10, total=TON // 10)  # one channel's worth
    async with (
        priced(engines[0], pays[0], CHEAP, NodeIdentity.generate()) as a,
        priced(engines[1], pays[1], CHEAP, NodeIdentity.generate()) as b,
        paying_client(market, budget) as (client, channels),
    ):
        for p in (a, b):
            await client.connect(p.addrs[0])
        for i in range(4):
            await client.complete(engines[0].info.model_id, f"job {i}", max_tokens=4,
                                  params=steady(engines[0]))
        assert channels.opened == 1 and channels.committed <= budget.total
    assert a.jobs.stats.jobs_started + b.jobs.stats.jobs_started == 4
    assert 0 in (a.jobs.stats.jobs_started, b.jobs.stats.jobs_started)


async def test_a_channel_too_spent_for_the_next_job_is_closed_paid_and_replaced(
    market: Market, engines: list[LlamaEngine]
) -> None:
    pay = market.provider_payments(0, CHEAP)
    before = market.wallet(0)
    async with priced(engines[0], pay, CHEAP, NodeIdentity.generate()) as prov:
        need = job_need(prov.advert(), CHEAP, "job 0", 12)  # every job below asks the same
        async with paying_client(market, Budget(deposit=need, total=TON)) as (client, channels):
            await client.connect(prov.addrs[0])
            costs = []
            for i in range(3):  # the contract takes no top-up: each job needs a new channel
                res = await client.complete(engines[0].info.model_id, f"job {i}",
                                            max_tokens=12, params=steady(engines[0]))
                costs.append(res.usage.cost_nanoton)
                assert 0 < costs[-1] < need
            assert (channels.opened, channels.closed) == (3, 2)
            assert market.chain.sends == 3 + 2  # an open per channel, a close per replaced one
            assert market.wallet(0) - before == sum(costs[:2])  # the replaced ones, exactly
            [last] = channels.channels
            assert await channels.close_all() == [last.channel_id]
    assert market.wallet(0) - before == sum(costs)
    refs = [r.ref for r in channels.payments.ledger.channels()]
    assert len(refs) == 3
    assert all(not pay.ledger.channel(r).is_open for r in refs)  # type: ignore[union-attr]


async def test_a_stream_continued_elsewhere_pays_each_provider_exactly_its_share(
    market: Market, engines: list[LlamaEngine]
) -> None:
    pays = [market.provider_payments(0, CHEAP), market.provider_payments(1, DEAR)]
    identities = [NodeIdentity.generate(), NodeIdentity.generate()]
    before = [market.wallet(0), market.wallet(1)]
    client_before = market.chain.balance(CLIENT_WALLET)
    scope = trio.CancelScope()
    shown: list[str] = []

    async def cheap_provider(task_status: Any) -> None:
        with scope:
            async with priced(engines[0], pays[0], CHEAP, identities[0]) as node:
                task_status.started(node)
                await trio.sleep_forever()

    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        cheap: ProviderNode = await nursery.start(cheap_provider)
        dear = await stack.enter_async_context(priced(engines[1], pays[1], DEAR, identities[1]))
        client, channels = await stack.enter_async_context(
            paying_client(market, Budget(deposit=TON, total=5 * TON), Strategy.CHEAPEST))
        for p in (cheap, dear):
            await client.connect(p.addrs[0])

        async def on_text(text: str) -> None:
            shown.append(text)
            if len(shown) == 30:
                scope.cancel()  # the cheap provider's host goes down mid-stream

        res = await client.complete(engines[0].info.model_id, "once upon a time",
                                    max_tokens=200, params=steady(engines[0]), on_text=on_text)
        first, second = res.segments
        assert (first.provider, second.provider) == (cheap.peer_id, dear.peer_id)
        assert first.error is not None and first.completion_tokens > 0
        assert first.completion_tokens + second.completion_tokens == 200
        # The cheap provider comes back (same payment keys and ledger; a new peer id: this
        # process's libp2p will not take the old one back) to close its channel.
        back = await stack.enter_async_context(priced(
            engines[0], market.provider_payments(0, CHEAP), CHEAP, NodeIdentity.generate()))
        await client.connect(back.addrs[0])
        refs = [channel_of(channels, p) for p in pays]
        jobs = [channels.payments.ledger.jobs(ref) for ref in refs]
        assert sorted(await channels.close_all()) == sorted(r.channel_id for r in refs)
        nursery.cancel_scope.cancel()
    [cut], [rest] = jobs  # what the client received from each, as it recorded it
    assert (cut.completion_tokens, cut.complete) == (first.completion_tokens, False)
    assert rest.completion_tokens == second.completion_tokens
    gains = [market.wallet(i) - before[i] for i in range(2)]
    assert gains[0] == CHEAP.cost(cut.prompt_tokens, cut.completion_tokens)
    assert gains[1] == DEAR.cost(rest.prompt_tokens, rest.completion_tokens)
    assert client_before - market.chain.balance(CLIENT_WALLET) == sum(gains)
    assert res.usage.cost_nanoton == sum(gains)
    assert "".join(shown) == res.text


async def test_an_idle_channel_is_closed_and_its_provider_paid_exactly(
    market: Market, engines: list[LlamaEngine]
) -> None:
    pay = market.provider_payments(0, CHEAP)
    before = market.wallet(0)
    async with (
        priced(engines[0], pay, CHEAP, NodeIdentity.generate()) as prov,
        paying_client(market, Budget(idle_close_s=60.0)) as (client, channels),
    ):
        await client.connect(prov.addrs[0])
        res = await client.complete(engines[0].info.model_id, "hi", max_tokens=6,
                                    params=steady(engines[0]))
        assert await channels.close_idle(now=channels.clock() + 30) == []
        assert len(await channels.close_idle(now=channels.clock() + 61)) == 1
        assert channels.channels == []
    assert market.wallet(0) - before == res.usage.cost_nanoton
