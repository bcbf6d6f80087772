"""The whole mesh on 127.0.0.1: 1 bootstrap, 5 llama.cpp providers, 1 light client that
knows only the bootstrap address, plus a provider reachable only through the relay."""

from __future__ import annotations

import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio

from meshnode.engine.llama import LlamaEngine, steady_logit_bias
from meshnode.engine.tinymodel import tiny_model_path
from meshnode.identity import NodeIdentity
from meshnode.node import ProviderNode, ProviderSettings, client_node, provider_node
from meshnode.p2p.discovery import BootstrapNode
from meshnode.p2p.host import full_addrs, running_host

pytestmark = pytest.mark.slow
# Provider i serves the tiny model written with seed SEEDS[i]: seeds 0-2 are served by
# exactly one provider each, seed 3 by two.
SEEDS = [0, 1, 2, 3, 3]


async def _mesh(stack: AsyncExitStack, models: Path, seeds: list[int], **extra: Any) -> tuple[
    str, list[ProviderNode], list[LlamaEngine]
]:
    boot_host = await stack.enter_async_context(running_host(NodeIdentity.generate()))
    boot = BootstrapNode(boot_host)
    nursery = await stack.enter_async_context(trio.open_nursery())
    stack.callback(nursery.cancel_scope.cancel)
    await nursery.start(boot.run)
    boot_addr = full_addrs(boot_host)[0]
    provs, engines = [], []
    for seed in seeds:
        engine = await LlamaEngine.load(tiny_model_path(models, seed=seed), n_ctx=512)
        stack.push_async_callback(engine.aclose)
        settings = ProviderSettings(bootstrap=(boot_addr,), **extra)
        provs.append(await stack.enter_async_context(
            provider_node(engine, identity=NodeIdentity.generate(), settings=settings)
        ))
        engines.append(engine)
    return boot_addr, provs, engines


def _steady(engine: LlamaEngine) -> dict[str, Any]:
    return {"temperature": 0.0, "logit_bias": steady_logit_bias(engine)}


async def test_client_with_only_bootstrap_finds_and_uses_providers(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    models = tmp_path_factory.getbasetemp() / "mesh-models"
    async with AsyncExitStack() as stack:
        boot_addr, provs, engines = await _mesh(stack, models, SEEDS)
        async with client_node(allow_insecure=True, bootstrap=(boot_addr,)) as client:
            unique = engines[1].info.model_id
            res = await client.complete(unique, "hello", max_tokens=6,
                                        params=_steady(engines[1]))
            assert res.usage.completion_tokens == 6
            assert res.providers == [provs[1].peer_id]

            shared = engines[3].info.model_id
            served = Counter()
            for i in range(12):
                r = await client.complete(shared, f"job {i}", max_tokens=4,
                                          params=_steady(engines[3]))
                served[r.providers[-1]] += 1
            assert set(served) == {provs[3].peer_id, provs[4].peer_id}
            assert all(p.jobs.stats.jobs_started == 0 for p in (provs[0], provs[2]))


async def test_provider_reachable_only_through_relay_completes_a_job(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    models = tmp_path_factory.getbasetemp() / "mesh-models"
    async with AsyncExitStack() as stack:
        boot_addr, _, _ = await _mesh(stack, models, [])
        engine = await LlamaEngine.load(tiny_model_path(models, seed=5), n_ctx=512)
        stack.push_async_callback(engine.aclose)
        hidden = await stack.enter_async_context(provider_node(
            engine,
            identity=NodeIdentity.generate(),
            settings=ProviderSettings(listen=None, bootstrap=(boot_addr,), relay=(boot_addr,)),
        ))
        assert hidden.host.get_addrs() == []  # nobody can dial it directly
        async with client_node(allow_insecure=True, bootstrap=(boot_addr,)) as client:
            with trio.fail_after(20):
                while not client.directory.providers_for(engine.info.model_id, time.time()):
                    await trio.sleep(0.1)
            advert = client.adverts[hidden.peer_id]
            assert advert.addrs and all("/p2p-circuit" in a for a in advert.addrs)
            res = await client.complete(engine.info.model_id, "through the relay",
                                        max_tokens=5, params=_steady(engine))
            assert res.usage.completion_tokens == 5 and res.providers == [hidden.peer_id]
