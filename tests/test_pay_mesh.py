"""Paid jobs over the mesh: a priced provider on 127.0.0.1 running the tiny llama model,
a client paying by vouchers on a channel opened in the emulated chain (real contract)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from libp2p.peer.id import ID
from pay_net import CLIENT_WALLET, DEPOSIT, PRICE, PROVIDER_WALLET, WINDOW_TOKENS, PayNet, pay_net
from pytoniq_core.boc.cell import Cell

from meshnode.core.advert import Advert
from meshnode.core.voucher import VoucherSigner
from meshnode.identity import NodeIdentity
from meshnode.jobs.client import JobError, JobRequest, run_job
from meshnode.jobs.payment_gate import NoPayer
from meshnode.node import ClientNode, ProviderNode, ProviderSettings, client_node, provider_node
from meshnode.pay.channel.ledger import ChannelRecord, Ledger
from meshnode.pay.channel.lifecycle import ClientChannel
from meshnode.pay.contract.cells import FEE_RESERVE
from meshnode.pay.metering.payer import ChannelPayer

if TYPE_CHECKING:
    from meshnode.engine.llama import LlamaEngine

pytestmark = pytest.mark.slow

MAX_TOKENS = 24


def steady(engine: LlamaEngine) -> dict[str, Any]:
    from meshnode.engine.llama import steady_logit_bias

    return {"temperature": 0.0, "seed": 7, "logit_bias": steady_logit_bias(engine)}


@dataclasses.dataclass
class Mesh:
    net: PayNet
    provider: ProviderNode
    client: ClientNode
    advert: Advert
    channel: ClientChannel

    @property
    def provider_id(self) -> ID:
        return ID.from_base58(self.advert.peer_id)


@asynccontextmanager
async def mesh(tmp_path: Path, code: Cell, engine: LlamaEngine) -> AsyncIterator[Mesh]:
    net = pay_net(tmp_path, code)
    settings = ProviderSettings(
        price_prompt_per_1k=PRICE.prompt_per_1k, price_completion_per_1k=PRICE.completion_per_1k
    )
    async with provider_node(
        engine, identity=NodeIdentity.generate(), settings=settings, payments=net.provider
    ) as prov:
        async with client_node(allow_insecure=True) as client:  # dev provider, no TEE here
            advert = await client.connect(prov.addrs[0])
            channel = await net.open_channel()
            await channel.announce(client.host, ID.from_base58(advert.peer_id))
            yield Mesh(net, prov, client, advert, channel)


async def test_a_job_is_paid_by_vouchers_and_the_bill_matches_them(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    async with mesh(tmp_path, code, tiny_engine) as m:
        payer = m.channel.payer(PRICE, WINDOW_TOKENS)
        res = await m.client.ask(
            m.advert, "hello world", max_tokens=MAX_TOKENS, params=steady(tiny_engine), payer=payer
        )
    assert res.usage.completion_tokens == MAX_TOKENS
    # The credit window is 4 tokens: the provider had to ask several times.
    assert len(payer.vouchers) >= MAX_TOKENS // WINDOW_TOKENS - 1
    expected = PRICE.cost(res.usage.prompt_tokens, res.usage.completion_tokens)
    assert res.usage.cost_nanoton == expected
    assert payer.vouchers[-1].sent - payer.job_base == expected
    stored = m.net.provider.ledger.latest_voucher(m.channel.ref)
    assert stored is not None and stored.voucher == payer.vouchers[-1]


async def test_jobs_then_a_cooperative_close_pay_the_provider_exactly_the_last_voucher(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    async with mesh(tmp_path, code, tiny_engine) as m:
        costs = []
        for prompt in ("hello world", "a second job"):
            res = await m.client.ask(
                m.advert,
                prompt,
                max_tokens=MAX_TOKENS,
                params=steady(tiny_engine),
                payer=m.channel.payer(PRICE, WINDOW_TOKENS),
            )
            costs.append(res.usage.cost_nanoton)
        last = m.channel.latest
        assert last is not None and last.sent == sum(costs)
        a_before = m.net.chain.balance(CLIENT_WALLET)
        b_before = m.net.chain.balance(PROVIDER_WALLET)
        await m.channel.close(m.client.host, m.provider_id)
    assert m.net.chain.balance(PROVIDER_WALLET) - b_before == last.sent
    assert m.net.chain.balance(CLIENT_WALLET) - a_before == DEPOSIT - last.sent + FEE_RESERVE
    assert m.net.chain.balance(m.channel.address) == 0
    assert m.net.chain.sends == 2  # open (deploy+deposit+init), close: not per job or token


async def test_a_priced_provider_refuses_a_job_without_a_channel(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    async with mesh(tmp_path, code, tiny_engine) as m:
        with pytest.raises(JobError) as info:
            await m.client.ask(m.advert, "free lunch?", max_tokens=4, params=steady(tiny_engine))
    assert info.value.code == "payment_required"
    assert info.value.before_first_token


async def test_a_forged_voucher_ends_the_job_and_the_node_keeps_serving(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    async with mesh(tmp_path, code, tiny_engine) as m:
        forged = forged_channel(m, tmp_path)
        forged_payer = forged.payer(PRICE, WINDOW_TOKENS)
        owner = m.channel.payer(PRICE, WINDOW_TOKENS)

        class ForgedVouchers:
            """The owner's job proof (the job is admitted), vouchers signed by another key."""

            def __getattr__(self, name: str) -> Any:
                return getattr(forged_payer, name)

            def authorize(self, job_id: bytes, client_pub: bytes, provider: str) -> bytes:
                return owner.authorize(job_id, client_pub, provider)

            def channel_key(self) -> bytes:
                return owner.channel_key()

            # The owner's client runs the job: it sees the Accept and the job's end.
            def begin(self, prompt: str) -> None:
                owner.begin(prompt)
                forged_payer.begin(prompt)

            def accepted(self, prompt_tokens: int | None, owed_before: int | None) -> None:
                owner.accepted(prompt_tokens, owed_before)
                forged_payer.accepted(prompt_tokens, owed_before)

            async def finish(self, received: int, complete: bool) -> None:
                await owner.finish(received, complete)

        with pytest.raises(JobError) as info:
            await m.client.ask(m.advert, "hello world", max_tokens=MAX_TOKENS,
                               params=steady(tiny_engine),
                               payer=ForgedVouchers())  # type: ignore[arg-type]
        assert info.value.code == "voucher_bad_signature"
        assert m.net.provider.ledger.latest_voucher(m.channel.ref) is None
        res = await m.client.ask(
            m.advert,
            "hello world",
            max_tokens=MAX_TOKENS,
            params=steady(tiny_engine),
            payer=m.channel.payer(PRICE, WINDOW_TOKENS),
        )
    assert res.usage.completion_tokens == MAX_TOKENS
    assert m.provider.jobs.stats.errors.get("voucher_bad_signature") == 1


class PaidAtPrefill:
    """The real engine behind the Engine interface, noting how much the provider's own
    ledger held in vouchers at the moment each generation (prefill first) began."""

    def __init__(self, engine: LlamaEngine) -> None:
        self._engine = engine
        self.info = engine.info
        self.available = True
        self.paid: Callable[[], int] = lambda: 0
        self.paid_at_start: list[int] = []

    def stream(self, prompt: str, params: Any, max_tokens: int) -> Any:
        self.paid_at_start.append(self.paid())
        return self._engine.stream(prompt, params, max_tokens)

    async def count_tokens(self, text: str) -> int:
        return await self._engine.count_tokens(text)

    async def aclose(self) -> None:
        return None


async def test_a_prompt_costing_more_than_the_window_is_paid_before_decoding(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    long_prompt = " ".join(["the river"] * 40)  # far more prompt cost than a 4-token window
    engine = PaidAtPrefill(tiny_engine)
    async with mesh(tmp_path, code, engine) as m:  # type: ignore[arg-type]

        def paid() -> int:
            stored = m.net.provider.ledger.latest_voucher(m.channel.ref)
            return 0 if stored is None else stored.voucher.sent

        engine.paid = paid
        res = await m.client.ask(m.advert, long_prompt, max_tokens=8,
                                 params=steady(tiny_engine),
                                 payer=m.channel.payer(PRICE, WINDOW_TOKENS))
    prompt_cost = PRICE.cost(res.usage.prompt_tokens, 0)
    assert prompt_cost > PRICE.window_cost(WINDOW_TOKENS)
    # llama.cpp started on the prompt only once the provider held a voucher for all of it
    # but the credit window.
    on_credit = PRICE.window_cost(WINDOW_TOKENS)
    assert engine.paid_at_start == [prompt_cost - on_credit]
    assert res.usage.completion_tokens == 8


def forged_channel(m: Mesh, tmp_path: Path) -> ClientChannel:
    """The victim's channel as a forger would hold it: same id, another signing key."""
    signer = VoucherSigner(bytes([9]) * 32)
    forger_ledger = Ledger(tmp_path / "forger")
    forger_ledger.add_channel(ChannelRecord(m.channel.channel_id, signer.public_key, DEPOSIT, 0.0))
    return dataclasses.replace(m.channel, signer=signer, ledger=forger_ledger)


@asynccontextmanager
async def stranger(m: Mesh) -> AsyncIterator[ClientNode]:
    """A second client that knows the victim's channel id (it is on chain) but not its key."""
    async with client_node(allow_insecure=True) as other:
        await other.connect(m.provider.addrs[0])
        yield other


async def assert_the_channel_is_free(m: Mesh, engine: LlamaEngine) -> None:
    res = await m.client.ask(
        m.advert,
        "hello world",
        max_tokens=MAX_TOKENS,
        params=steady(engine),
        payer=m.channel.payer(PRICE, WINDOW_TOKENS),
    )
    assert res.usage.completion_tokens == MAX_TOKENS


async def test_a_job_naming_a_channel_without_its_keys_proof_is_refused(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    async with mesh(tmp_path, code, tiny_engine) as m, stranger(m) as other:
        request = JobRequest(
            model_id=m.advert.models[0].id,
            prompt="hello world",
            max_tokens=MAX_TOKENS,
            params=steady(tiny_engine),
            channel_id=m.channel.channel_id,
        )

        class NamesOnly(NoPayer):
            """Names the victim's channel (id and key are public), with no proof."""

            def channel_key(self) -> bytes:
                return m.channel.signer.public_key

        with pytest.raises(JobError) as info:
            await run_job(other.host, m.provider_id, m.advert.job_pubkey, request,
                          payer=NamesOnly())
        assert info.value.code == "channel_auth"
        assert info.value.before_first_token
        await assert_the_channel_is_free(m, tiny_engine)
    assert m.provider.jobs.stats.errors.get("channel_auth") == 1


async def test_a_job_whose_proof_is_signed_by_another_key_is_refused(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    async with mesh(tmp_path, code, tiny_engine) as m, stranger(m) as other:
        forged_payer = forged_channel(m, tmp_path).payer(PRICE, WINDOW_TOKENS)

        class NamingTheVictim:
            """A proof signed by the forger's key for a job naming the victim's channel."""

            def __getattr__(self, name: str) -> Any:
                return getattr(forged_payer, name)

            def channel_key(self) -> bytes:
                return m.channel.signer.public_key

        with pytest.raises(JobError) as info:
            await other.ask(
                m.advert,
                "hello world",
                max_tokens=MAX_TOKENS,
                params=steady(tiny_engine),
                payer=NamingTheVictim(),  # type: ignore[arg-type]
            )
        assert info.value.code == "channel_auth"
        await assert_the_channel_is_free(m, tiny_engine)
    assert m.provider.jobs.stats.errors == {"channel_auth": 1}


async def test_a_channel_that_runs_dry_mid_job_ends_it_paid_exactly_for_what_arrived(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    async with mesh(tmp_path, code, tiny_engine) as m:
        # Enough for the admission (one window) and a few tokens, not for 24 of them.
        dry = await m.net.open_channel(deposit=PRICE.window_cost(WINDOW_TOKENS)
                                       + PRICE.cost(40, 6))
        await dry.announce(m.client.host, m.provider_id)
        payer = dry.payer(PRICE, WINDOW_TOKENS)
        with pytest.raises(JobError) as info:
            await m.client.ask(m.advert, "hello world", max_tokens=MAX_TOKENS,
                               params=steady(tiny_engine), payer=payer)
        assert info.value.code == "channel_exhausted"
        got = info.value.received_tokens
        assert 0 < got < MAX_TOKENS
        [job] = m.net.client.ledger.jobs(dry.ref)
        stored = m.net.provider.ledger.latest_voucher(dry.ref)
        assert stored is not None and dry.latest == stored.voucher
        assert stored.voucher.sent == PRICE.cost(job.prompt_tokens, got) <= dry.deposit
        await assert_the_channel_is_free(m, tiny_engine)  # the funded channel still works


async def test_a_legitimate_job_completes_while_a_cheap_channel_floods_the_provider(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine
) -> None:
    async with mesh(tmp_path, code, tiny_engine) as m:
        cheap = await m.net.open_channel(deposit=1)
        await cheap.announce(m.client.host, m.provider_id)
        floods: list[str] = []

        async def flood() -> None:
            request = JobRequest(model_id=m.advert.models[0].id, prompt="free lunch",
                                 max_tokens=MAX_TOKENS, params=steady(tiny_engine))
            while True:
                try:
                    await run_job(m.client.host, m.provider_id, m.advert.job_pubkey, request,
                                  payer=cheap.payer(PRICE, WINDOW_TOKENS))
                except JobError as exc:
                    floods.append(exc.code)
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(flood)
            with trio.fail_after(10):
                while len(floods) < 20:
                    await trio.sleep(0.01)
            for _ in range(3):
                await assert_the_channel_is_free(m, tiny_engine)
            nursery.cancel_scope.cancel()
    assert set(floods) == {"deposit_low"}
    assert m.provider.jobs.stats.busy_refusals == 0


PATIENCE_S = 0.5
"""The provider's wait for a voucher in the test below (PAYMENT_TIMEOUT_S is 30 s)."""


class StoppedPayer(ChannelPayer):
    """A client that stops paying but keeps the stream open: its first voucher comes
    only after the provider has stopped waiting for it."""

    async def voucher_for(self, owed: int, received: int) -> bytes:
        await trio.sleep(3 * PATIENCE_S)
        return await super().voucher_for(owed, received)


async def test_a_client_that_stops_paying_gets_a_timeout_and_both_ledgers_count_the_debt(
    tmp_path: Path, code: Cell, tiny_engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from meshnode.jobs import provider

    monkeypatch.setattr(provider, "PAYMENT_TIMEOUT_S", PATIENCE_S)
    async with mesh(tmp_path, code, tiny_engine) as m:
        payer = StoppedPayer(m.channel, PRICE, WINDOW_TOKENS)
        with pytest.raises(JobError) as info:
            await m.client.ask(m.advert, "hello world", max_tokens=MAX_TOKENS,
                               params=steady(tiny_engine), payer=payer)
        assert info.value.code == "timeout"
        got = info.value.received_tokens
        assert 0 < got <= WINDOW_TOKENS  # no more than the credit window, unpaid
        ref = m.channel.ref
        owed = m.net.provider.ledger.channel_owed(ref)
        assert owed == m.net.client.ledger.channel_owed(ref) > 0  # the same debt, both sides
        assert m.net.provider.ledger.latest_voucher(ref) is None  # nothing was paid
        assert m.provider.jobs.stats.errors == {"timeout": 1}
