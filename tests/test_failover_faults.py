"""Client failover after the faults the chaos testnet found (issue 13), on real provider
nodes on 127.0.0.1 with the tiny model: a connection cut as a job starts, a stream cut
after its last token, a provider whose dial just failed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from libp2p.peer.id import ID

from meshnode.core.advert import Advert
from meshnode.core.job_protocol import STALL_FLOOR_S
from meshnode.engine.llama import LlamaEngine, steady_logit_bias
from meshnode.identity import NodeIdentity
from meshnode.node import ClientNode, ProviderSettings, client_node, provider_node

pytestmark = pytest.mark.slow


def steady(engine: LlamaEngine) -> dict[str, Any]:
    return {"temperature": 0.0, "logit_bias": steady_logit_bias(engine)}


async def test_a_job_started_as_its_connection_is_cut_redials_the_live_provider(
    tiny_engine: LlamaEngine,
) -> None:
    async with (
        provider_node(tiny_engine, identity=NodeIdentity.generate()) as prov,
        client_node(allow_insecure=True) as client,
    ):
        await client.connect(prov.addrs[0])
        dial = client.jobs.dial
        peer = ID.from_base58(prov.peer_id)
        cut: list[object] = []

        async def dial_then_cut(advert: Advert) -> None:
            # The chaos harness's cut (closing the connection) landing between the
            # client's "connected?" check and its stream open: the connection is marked
            # closed at once, its removal from the swarm's table comes later.
            await dial(advert)
            if not cut:
                conn = client.host.get_network().connections[peer][0]
                cut.append(conn)
                trio.lowlevel.spawn_system_task(conn.close)
                await trio.sleep(0)

        client.jobs.dial = dial_then_cut
        with trio.fail_after(20):
            res = await client.complete(tiny_engine.info.model_id, "hi", max_tokens=5,
                                        params=steady(tiny_engine))
            again = await client.complete(tiny_engine.info.model_id, "hi", max_tokens=5,
                                          params=steady(tiny_engine))
    assert cut, "the connection was not cut"
    assert [(s.provider, s.error) for s in res.segments] == [(prov.peer_id, None)]
    assert res.usage.completion_tokens == 5 and again.usage.completion_tokens == 5


@asynccontextmanager
async def _two_providers(
    engines: list[LlamaEngine], **client_kw: Any
) -> AsyncIterator[tuple[ClientNode, list[str]]]:
    cheap = ProviderSettings(price_completion_per_1k=1)
    dear = ProviderSettings(price_completion_per_1k=1000)
    async with (
        provider_node(engines[0], identity=NodeIdentity.generate(), settings=cheap) as a,
        provider_node(engines[1], identity=NodeIdentity.generate(), settings=dear) as b,
        client_node(allow_insecure=True, **client_kw) as client,
    ):
        for p in (a, b):
            await client.connect(p.addrs[0])
        yield client, [a.peer_id, b.peer_id]


class _SilentAtEndEngine:
    """The real llama.cpp engine whose stream, once it produced all its tokens, does not
    end: the provider has sent every token and never sends Done. ``exhausted`` is set
    then, so the test can cut the connection between the last token and Done."""

    def __init__(self, engine: LlamaEngine) -> None:
        self._engine = engine
        self.info = engine.info
        self.available = True
        self.exhausted = trio.Event()

    @asynccontextmanager
    async def stream(self, prompt: str, params: Any, max_tokens: int) -> AsyncIterator[Any]:
        async with self._engine.stream(prompt, params, max_tokens) as gen:
            yield _SilentAtEnd(gen, self.exhausted)

    async def count_tokens(self, text: str) -> int:
        return await self._engine.count_tokens(text)

    async def aclose(self) -> None:
        return None


class _SilentAtEnd:
    def __init__(self, inner: Any, exhausted: trio.Event) -> None:
        self._inner = inner
        self._exhausted = exhausted

    def __aiter__(self) -> _SilentAtEnd:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._inner.__anext__()
        except StopAsyncIteration:
            self._exhausted.set()
            await trio.sleep_forever()
            raise

    def ready(self) -> list[Any]:
        return []

    @property
    def finish_reason(self) -> Any:
        return self._inner.finish_reason

    @property
    def usage(self) -> Any:
        return self._inner.usage


# Loopback delivers the last token frame well within this after the engine produced it.
LAST_FRAME_DELIVERY_S = 0.5


async def test_a_stream_cut_after_the_last_token_ends_the_job_with_the_whole_answer(
    long_engines: list[LlamaEngine],
) -> None:
    from meshnode.core.router import Strategy

    silent = _SilentAtEndEngine(long_engines[0])
    cheap = ProviderSettings(price_completion_per_1k=1)
    dear = ProviderSettings(price_completion_per_1k=1000)
    shown: list[str] = []

    async def on_text(text: str) -> None:
        shown.append(text)

    async with (
        provider_node(silent, identity=NodeIdentity.generate(), settings=cheap) as a,  # type: ignore[arg-type]
        provider_node(long_engines[1], identity=NodeIdentity.generate(), settings=dear) as b,
        client_node(allow_insecure=True, strategy=Strategy.CHEAPEST) as client,
    ):
        for p in (a, b):
            await client.connect(p.addrs[0])

        async def cut_before_done() -> None:
            await silent.exhausted.wait()
            await trio.sleep(LAST_FRAME_DELIVERY_S)
            await client.host.get_network().close_peer(ID.from_base58(a.peer_id))

        # Well under the stall bound: the cut, not a stall, ends the first stream.
        with trio.fail_after(STALL_FLOOR_S + 10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cut_before_done)
                res = await client.complete(long_engines[0].info.model_id,
                                            "once upon a time", max_tokens=12,
                                            params=steady(long_engines[0]), on_text=on_text)
    assert [(s.provider, s.error) for s in res.segments] == [(a.peer_id, "disconnected")]
    assert not b.jobs.stats.errors  # no Open for 0 tokens went there (refused: schema)
    assert res.usage.completion_tokens == 12 and res.usage.finish_reason == "length"
    assert res.text == "".join(shown) and res.segments[0].chars == len(res.text) > 0


async def test_a_provider_whose_dial_failed_is_skipped_for_the_next_jobs(
    long_engines: list[LlamaEngine],
) -> None:
    from meshnode.core.router import Strategy

    async with _two_providers(long_engines, strategy=Strategy.CHEAPEST) as (client, peers):
        dial = client.jobs.dial
        dead = peers[0]  # the cheapest: chosen first by every job while it looks alive
        dials: list[str] = []

        async def dial_or_fail(advert: Advert) -> None:
            dials.append(advert.peer_id)
            if advert.peer_id == dead:  # its process is gone; its advert is still listed
                raise ConnectionError("connection refused")
            await dial(advert)

        client.jobs.dial = dial_or_fail
        with trio.fail_after(30):
            for _ in range(3):
                res = await client.complete(long_engines[0].info.model_id, "hi",
                                            max_tokens=3, params=steady(long_engines[0]))
                assert res.providers[-1] == peers[1]
    # One attempt on the dead provider, not one per job.
    assert dials.count(dead) == 1, dials
