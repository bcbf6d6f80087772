"""A provider and a light client on 127.0.0.1 run encrypted llama.cpp jobs over libp2p."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from meshnode.engine.llama import LlamaEngine, steady_logit_bias
from meshnode.identity import NodeIdentity
from meshnode.jobs.client import JobError
from meshnode.node import client_node, provider_node

pytestmark = pytest.mark.slow


def steady(engine: LlamaEngine) -> dict[str, Any]:
    return {"temperature": 0.0, "seed": 7, "logit_bias": steady_logit_bias(engine)}


async def test_job_streams_tokens_end_to_end(long_engine: LlamaEngine) -> None:
    async with provider_node(long_engine, identity=NodeIdentity.generate()) as prov:
        async with client_node(allow_insecure=True) as client:
            advert = await client.connect(prov.addrs[0])
            assert advert.job_pubkey == prov.identity.job_public
            pieces: list[str] = []

            async def on_text(t: str) -> None:
                pieces.append(t)

            res = await client.ask(
                advert, "hello world", max_tokens=24, params=steady(long_engine), on_text=on_text
            )
    assert res.usage.completion_tokens == 24
    assert res.usage.finish_reason == "length"
    assert len(pieces) > 1 and "".join(pieces) == res.text
    assert res.usage.prompt_tokens == await long_engine.count_tokens("hello world")
    # The same request through llama.cpp directly gives the same text: the mesh adds
    # transport, not changes.
    from meshnode.engine.base import SamplingParams

    direct = []
    params = SamplingParams.from_dict(steady(long_engine))
    async with long_engine.stream("hello world", params, 24) as g:
        async for chunk in g:
            direct.append(chunk.text)
    assert "".join(direct) == res.text


async def test_unknown_model_is_refused_and_node_keeps_serving(long_engine: LlamaEngine) -> None:
    async with provider_node(long_engine, identity=NodeIdentity.generate()) as prov:
        async with client_node(allow_insecure=True) as client:
            advert = await client.connect(prov.addrs[0])
            from libp2p.peer.id import ID

            from meshnode.jobs.client import JobRequest, run_job

            with pytest.raises(JobError) as info:
                await run_job(
                    client.host,
                    ID.from_base58(advert.peer_id),
                    advert.job_pubkey,
                    JobRequest(model_id="00" * 32, prompt="x", max_tokens=4, params={}),
                )
            assert info.value.code == "unknown_model"
            res = await client.ask(advert, "again", max_tokens=4, params=steady(long_engine))
            assert res.usage.completion_tokens == 4


async def test_client_disconnect_stops_engine(long_engine: LlamaEngine) -> None:
    async with provider_node(long_engine, identity=NodeIdentity.generate()) as prov:
        async with client_node(allow_insecure=True) as client:
            advert = await client.connect(prov.addrs[0])
            got_first = trio.Event()

            async def on_text(t: str) -> None:
                got_first.set()

            with trio.move_on_after(30):
                async with trio.open_nursery() as nursery:

                    async def job() -> None:
                        await client.ask(
                            advert, "go", max_tokens=4000, params=steady(long_engine),
                            on_text=on_text,
                        )

                    nursery.start_soon(job)
                    await got_first.wait()
                    nursery.cancel_scope.cancel()  # the client walks away mid-stream
            assert got_first.is_set()
            # Within a bounded time the provider has ended the job (counted it, closed its
            # stream) and its engine is free: the stream's exit waited for the decode
            # thread to stop, so nothing decodes any more.
            with trio.fail_after(10):
                await prov.jobs.wait_quiet()
            assert not long_engine.busy
            assert long_engine.decoded_tokens_total < 4000
            assert prov.jobs.stats.jobs_cancelled == 1


class _AheadGeneration:
    """A real generation run to the end before its first chunk is handed out: the
    engine is as far ahead of the sender as it can be, whatever the machine's load."""

    def __init__(self, chunks: list[Any], inner: Any) -> None:
        self._chunks = chunks
        self._inner = inner

    def __aiter__(self) -> _AheadGeneration:
        return self

    async def __anext__(self) -> Any:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)

    def ready(self) -> list[Any]:
        out, self._chunks = self._chunks, []
        return out

    @property
    def finish_reason(self) -> Any:
        return self._inner.finish_reason

    @property
    def usage(self) -> Any:
        return self._inner.usage


class _AheadEngine:
    """The real llama.cpp engine, with every chunk produced before sending starts."""

    def __init__(self, engine: LlamaEngine) -> None:
        self._engine = engine
        self.info = engine.info
        self.available = True

    @asynccontextmanager
    async def stream(self, prompt: str, params: Any, max_tokens: int) -> AsyncIterator[Any]:
        async with self._engine.stream(prompt, params, max_tokens) as gen:
            chunks = [c async for c in gen]
            yield _AheadGeneration(chunks, gen)

    async def count_tokens(self, text: str) -> int:
        return await self._engine.count_tokens(text)

    async def aclose(self) -> None:
        pass


async def test_tokens_the_engine_made_while_sending_go_out_batched_and_intact(
    long_engine: LlamaEngine,
) -> None:
    ahead = _AheadEngine(long_engine)
    async with provider_node(ahead, identity=NodeIdentity.generate()) as prov:  # type: ignore[arg-type]
        async with client_node(allow_insecure=True) as client:
            advert = await client.connect(prov.addrs[0])
            pieces: list[str] = []

            async def on_text(t: str) -> None:
                pieces.append(t)

            res = await client.ask(advert, "hello world", max_tokens=60,
                                   params=steady(long_engine), on_text=on_text)
    assert res.usage.completion_tokens == 60
    # 60 ready tokens fit in a handful of frames (MAX_BATCH_CHARS each), not 60.
    assert len(pieces) <= 4, len(pieces)
    from meshnode.engine.base import SamplingParams

    direct = []
    params = SamplingParams.from_dict(steady(long_engine))
    async with long_engine.stream("hello world", params, 60) as g:
        async for chunk in g:
            direct.append(chunk.text)
    assert "".join(pieces) == "".join(direct)

