"""The API under load: bursts of connections, and 200 concurrent jobs on 3 providers.

Real parts throughout: hypercorn on loopback, three providers (libp2p hosts, llama.cpp on
the tiny model) and a light client routing between them. The load itself is
`bench/load.py`'s `drive()`, the same code the full-size benchmark runs with 1,000
requests in separate processes; here it is sized for CI.
"""

from __future__ import annotations

import importlib.util
import resource
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from meshnode.api.backend import (
    CompletionRequest,
    CompletionResult,
    ModelCard,
    OnText,
    RoutedBackend,
)
from meshnode.api.server import WANTED_OPEN_FILES, serve_api
from meshnode.engine.llama import LlamaEngine
from meshnode.identity import NodeIdentity
from meshnode.node import ProviderSettings, client_node, provider_node

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location(
    "bench_load", Path(__file__).resolve().parent.parent / "bench" / "load.py")
assert _spec is not None and _spec.loader is not None
bench_load: Any = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench_load  # dataclasses look their module up there
_spec.loader.exec_module(bench_load)

# More simultaneous connects than hypercorn's default listen backlog (100) holds: with it,
# about a quarter of them were reset (92 of 400 here, 177 of 1,000 in the issue).
BURST_CONNECTIONS = 400
PROVIDERS = 3
CONCURRENT_REQUESTS = 200
# The whole 200-request run, including queueing on three one-slot providers, on a loaded
# 2-core box; a deadlock or a hung request fails it.
LOAD_DEADLINE_S = 60.0
# What 200 in-flight requests may add to the process (bodies, streams, HTTP state); a leak
# per request or an unbounded queue of bodies would pass it.
RSS_GROWTH_LIMIT_MIB = 150.0

CARD = ModelCard(id="b" * 64, name="quick", quant="Q4_K_M", ctx=2048, providers=1,
                 verified_providers=1, price_prompt_per_1k=0, price_completion_per_1k=0,
                 chat_format="generic")


class QuickBackend:
    """Answers every completion after a short pause, as a fast provider would."""

    def list_models(self) -> list[ModelCard]:
        return [CARD]

    async def complete(self, req: CompletionRequest, on_text: OnText | None) -> CompletionResult:
        await trio.sleep(0.05)
        return CompletionResult(text="ok", finish_reason="stop", prompt_tokens=1,
                                completion_tokens=1, cost_nanoton=0, provider="12D3KooWq",
                                insecure=False)


async def test_a_burst_of_simultaneous_connections_is_queued_not_reset() -> None:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_api, QuickBackend(), "127.0.0.1", 0))
        result = await bench_load.drive(url, CARD.id, requests=BURST_CONNECTIONS,
                                        concurrency=BURST_CONNECTIONS)
        nursery.cancel_scope.cancel()
    assert dict(result.outcomes) == {"ok": BURST_CONNECTIONS}


@asynccontextmanager
async def three_provider_api(
    tiny_gguf_path: Path, stats_path: Path
) -> AsyncIterator[tuple[str, str]]:
    """The API of a light client that knows three one-slot providers: (url, model id).
    It persists peer statistics, as `meshnode client` does: every finished job saves."""
    async with AsyncExitStack() as stack:
        addrs = []
        model = ""
        for _ in range(PROVIDERS):
            engine = await stack.enter_async_context(
                await LlamaEngine.load(tiny_gguf_path, n_ctx=512))
            model = engine.info.model_id
            prov = await stack.enter_async_context(provider_node(
                engine, identity=NodeIdentity.generate(),
                settings=ProviderSettings(slots=1, max_queue=4)))
            addrs.append(prov.addrs[0])
        client = await stack.enter_async_context(client_node(allow_insecure=True,
                                                                   stats_path=stats_path))
        for addr in addrs:
            await client.connect(addr)
        nursery = await stack.enter_async_context(trio.open_nursery())
        url = await nursery.start(partial(serve_api, RoutedBackend(client), "127.0.0.1", 0))
        yield url, model
        nursery.cancel_scope.cancel()


async def test_200_concurrent_requests_on_3_providers_complete_or_get_503_busy(
    tiny_gguf_path: Path, tmp_path: Path
) -> None:
    async with three_provider_api(tiny_gguf_path, tmp_path / "peer-stats.json") as (url, model):
        with trio.fail_after(LOAD_DEADLINE_S):
            result = await bench_load.drive(url, model, requests=CONCURRENT_REQUESTS,
                                            concurrency=CONCURRENT_REQUESTS, max_tokens=4)
        summary = result.summary()
        print("load:", summary)  # p50/p99 and RSS, shown with -s
        assert result.errors == 0, summary
        assert result.outcomes["ok"] + result.outcomes["busy"] == CONCURRENT_REQUESTS
        assert result.outcomes["ok"] >= PROVIDERS, summary
        assert result.busy_without_retry_after == 0
        assert result.rss_peak_mib - result.rss_start_mib < RSS_GROWTH_LIMIT_MIB, summary
        # Responsive after the load: the next request gets its completion.
        async with httpx.AsyncClient(timeout=30) as http:
            resp = await http.post(f"{url}/v1/completions",
                                   json={"model": model, "prompt": "hi", "max_tokens": 4})
        assert resp.status_code == 200, resp.text


async def test_serving_the_api_raises_a_low_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 256  # below a 1,000-connection burst, as a default 1,024 limit is too
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    now = low
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_api, QuickBackend(), "127.0.0.1", 0))
            now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            nursery.cancel_scope.cancel()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, now), hard))
    expected = WANTED_OPEN_FILES if hard == resource.RLIM_INFINITY else min(
        WANTED_OPEN_FILES, hard)
    assert now == expected
