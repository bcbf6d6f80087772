"""A provider whose engine runner dies mid-job: the client gets a typed error or fails
over, the node keeps its identity and its payment ledger, and the runner comes back."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID
from pay_net import PRICE, WINDOW_TOKENS, pay_net
from pytoniq_core.boc.cell import Cell

from meshnode.engine.base import EngineUnavailable, SamplingParams
from meshnode.engine.supervised import RunnerConfig, RunnerState, open_supervised_engine
from meshnode.identity import NodeIdentity
from meshnode.jobs.client import JobError
from meshnode.node import ProviderSettings, client_node, provider_node

pytestmark = pytest.mark.slow

CTX = 512
# Restarting the tiny model's runner takes about a second; allow for a loaded machine.
RECOVERY_TIMEOUT_S = 30.0


def runner(model: Path, fault: str | None = None) -> RunnerConfig:
    return RunnerConfig(model=model, n_ctx=CTX, fault=fault, backoff_initial_s=0.05)


async def test_a_runner_crash_mid_job_keeps_the_node_its_ledger_and_its_next_job(
    tmp_path: Path, code: Cell, tiny_gguf_path: Path
) -> None:
    net = pay_net(tmp_path, code)
    settings = ProviderSettings(price_prompt_per_1k=PRICE.prompt_per_1k,
                                price_completion_per_1k=PRICE.completion_per_1k)
    identity = NodeIdentity.generate()
    async with (
        open_supervised_engine(runner(tiny_gguf_path, fault="abort:12")) as engine,
        provider_node(engine, identity=identity, settings=settings,
                      payments=net.provider) as prov,
    ):
        params = {"temperature": 0.0, "seed": 7, "logit_bias": await engine.steady_logit_bias()}
        async with client_node(allow_insecure=True) as client:
            advert = await client.connect(prov.addrs[0])
            channel = await net.open_channel()
            await channel.announce(client.host, ID.from_base58(advert.peer_id))
            payer = channel.payer(PRICE, WINDOW_TOKENS)
            with pytest.raises(JobError) as info:
                await client.ask(advert, "hello world", max_tokens=24, params=params,
                                 payer=payer)
            assert info.value.code == "engine_unavailable"
            assert 0 < info.value.received_tokens <= 12
            # Every voucher the client signed before the crash is on the provider's disk.
            stored = net.provider.ledger.latest_voucher(channel.ref)
            assert stored is not None and stored.voucher == payer.vouchers[-1]
            with trio.fail_after(RECOVERY_TIMEOUT_S):
                while engine.state != RunnerState.READY:
                    await trio.sleep(0.05)
            assert engine.restarts == 1
            assert prov.peer_id == advert.peer_id
            again = await client.ask(advert, "hello world", max_tokens=24, params=params,
                                     payer=channel.payer(PRICE, WINDOW_TOKENS))
            assert again.usage.completion_tokens == 24
            assert net.provider.ledger.latest_voucher(channel.ref).voucher.sent \
                > stored.voucher.sent  # type: ignore[union-attr]


async def test_a_routed_job_continues_on_another_provider_when_a_runner_crashes(
    tiny_gguf_path: Path,
) -> None:
    max_tokens = 120
    async with (
        open_supervised_engine(runner(tiny_gguf_path, fault="segv:40")) as crashing,
        open_supervised_engine(runner(tiny_gguf_path)) as healthy,
        provider_node(crashing, identity=NodeIdentity.generate()) as first,
        provider_node(healthy, identity=NodeIdentity.generate()) as second,
        client_node(allow_insecure=True) as client,
    ):
        params = {"temperature": 0.0, "logit_bias": await healthy.steady_logit_bias()}
        await client.connect(first.addrs[0])  # the only provider known when the job starts
        shown: list[str] = []

        async def on_text(text: str) -> None:
            if not shown:
                await client.connect(second.addrs[0])  # known in time for the failover
            shown.append(text)

        res = await client.complete(healthy.info.model_id, "once upon a time",
                                    max_tokens=max_tokens, params=params, on_text=on_text)
    failed, finished = res.segments
    assert failed.provider == first.peer_id and failed.error == "engine_unavailable"
    assert finished.provider == second.peer_id and finished.error is None
    assert 0 < failed.completion_tokens <= 40
    assert res.usage.completion_tokens == max_tokens
    assert "".join(shown) == res.text  # one continuous text, nothing doubled or dropped


async def test_the_advert_marks_the_model_down_while_the_runner_restarts(
    tiny_gguf_path: Path,
) -> None:
    async with (
        open_supervised_engine(RunnerConfig(model=tiny_gguf_path, n_ctx=CTX, fault="exit:3",
                                            backoff_initial_s=1.0)) as engine,
        provider_node(engine, identity=NodeIdentity.generate()) as prov,
    ):
        assert prov.advert().models[0].available
        with pytest.raises(EngineUnavailable):
            async with engine.stream("hello", SamplingParams(temperature=0.0), 20) as gen:
                async for _ in gen:
                    pass
        assert engine.state == RunnerState.RESTARTING
        assert not prov.advert().models[0].available
        with trio.fail_after(RECOVERY_TIMEOUT_S):
            while engine.state != RunnerState.READY:
                await trio.sleep(0.05)
        assert prov.advert().models[0].available
