"""Many parallel requests through the OpenAI endpoint: batching providers take them all,
and a mesh that is only busy answers 503 with Retry-After, never "no provider"."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio

from meshnode.api.backend import RoutedBackend
from meshnode.api.server import serve_api
from meshnode.engine.supervised import RunnerConfig, open_supervised_engine
from meshnode.identity import NodeIdentity
from meshnode.node import ProviderSettings, client_node, provider_node

pytestmark = pytest.mark.slow

CTX = 1024
# A loaded 2-core box serves 16 x 48 tokens of the tiny model in seconds; generous.
SDK_TIMEOUT_S = 120.0


async def test_sixteen_parallel_requests_on_two_providers_all_complete(
    tiny_gguf_path: Path,
) -> None:
    slots, queue = 4, 4  # 8 places per provider, 16 in all
    async with (
        open_supervised_engine(RunnerConfig(model=tiny_gguf_path, n_ctx=CTX,
                                            slots=slots)) as e1,
        open_supervised_engine(RunnerConfig(model=tiny_gguf_path, n_ctx=CTX,
                                            slots=slots)) as e2,
        provider_node(e1, identity=NodeIdentity.generate(),
                      settings=ProviderSettings(slots=slots, max_queue=queue)) as p1,
        provider_node(e2, identity=NodeIdentity.generate(),
                      settings=ProviderSettings(slots=slots, max_queue=queue)) as p2,
        client_node(allow_insecure=True) as client,
        trio.open_nursery() as nursery,
    ):
        for prov in (p1, p2):
            await client.connect(prov.addrs[0])
        url = await nursery.start(partial(serve_api, RoutedBackend(client), "127.0.0.1", 0))
        bias = {str(k): v for k, v in (await e1.steady_logit_bias()).items()}
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                            timeout=SDK_TIMEOUT_S)
        results: list[Any] = []
        failures: list[BaseException] = []

        def one(i: int) -> None:
            try:
                results.append(sdk.completions.create(
                    model=e1.info.model_id, prompt=f"request {i}", max_tokens=48,
                    temperature=0.0, extra_body={"logit_bias": bias}))
            except Exception as exc:
                failures.append(exc)

        async with trio.open_nursery() as requests:
            for i in range(16):
                requests.start_soon(trio.to_thread.run_sync, one, i)
        nursery.cancel_scope.cancel()
    assert not failures, failures[:3]
    assert len(results) == 16
    assert all(r.usage.completion_tokens == 48 for r in results)
    refused = p1.jobs.stats.busy_refusals + p2.jobs.stats.busy_refusals
    assert refused == 0
    assert p1.jobs.stats.jobs_completed > 0 and p2.jobs.stats.jobs_completed > 0


async def test_a_mesh_that_is_only_busy_answers_503_with_retry_after(
    tiny_gguf_path: Path,
) -> None:
    async with (
        open_supervised_engine(RunnerConfig(model=tiny_gguf_path, n_ctx=CTX,
                                            slots=1)) as engine,
        provider_node(engine, identity=NodeIdentity.generate(),
                      settings=ProviderSettings(slots=1, max_queue=0)) as prov,
        client_node(allow_insecure=True) as client,
        trio.open_nursery() as nursery,
    ):
        await client.connect(prov.addrs[0])
        url = await nursery.start(partial(serve_api, RoutedBackend(client), "127.0.0.1", 0))
        bias = {str(k): v for k, v in (await engine.steady_logit_bias()).items()}
        # Teach the provider a long mean job time, so its Busy says "come back later".
        prov.jobs.stats.observe_job_time(30.0)
        body = {"model": engine.info.model_id, "prompt": "hello", "max_tokens": 900,
                "temperature": 0.0, "logit_bias": bias}

        async def hold_the_slot() -> None:
            async with httpx.AsyncClient(timeout=SDK_TIMEOUT_S) as http:
                await http.post(f"{url}/v1/completions", json=body)

        nursery.start_soon(hold_the_slot)
        with trio.fail_after(SDK_TIMEOUT_S):
            while not prov.jobs.active:
                await trio.sleep(0.01)
        async with httpx.AsyncClient(timeout=SDK_TIMEOUT_S) as http:
            res = await http.post(f"{url}/v1/completions", json={**body, "max_tokens": 4})
        nursery.cancel_scope.cancel()
    assert res.status_code == 503
    assert int(res.headers["retry-after"]) >= 10
    message = res.json()["error"]["message"]
    assert "busy" in message and "no eligible provider" not in message
    assert res.json()["error"]["code"] == "provider_busy"
