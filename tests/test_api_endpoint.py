"""The light client's OpenAI-compatible endpoint, driven by the real `openai` SDK.

A provider (llama.cpp on the tiny model) and a light client run on 127.0.0.1; the
endpoint is served by hypercorn on the test's trio loop, and the synchronous SDK runs in
a worker thread. Greedy sampling with the steady logit bias makes every answer
reproducible, so the expected text comes from the engine itself, not from a literal.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import openai
import pytest
import trio
from openai.types.chat import ChatCompletionMessageParam

from meshnode.api.backend import CompletionBackend, RoutedBackend, SingleProviderBackend
from meshnode.api.chat_format import ChatMessage, render_chat
from meshnode.api.openai_response import INSECURE_NOTICE
from meshnode.api.server import serve_api
from meshnode.engine.base import SamplingParams
from meshnode.engine.llama import LlamaEngine, steady_logit_bias
from meshnode.engine.tinymodel import tiny_model_path
from meshnode.identity import NodeIdentity
from meshnode.node import ProviderNode, client_node, provider_node

pytestmark = pytest.mark.slow

T = TypeVar("T")

# Room for the disconnect test's long generation; the tiny model allocates it instantly.
ENGINE_CTX = 4096
# Generous for a loopback round trip, short enough that a hung server fails the test.
SDK_TIMEOUT_S = 30.0


@pytest.fixture
async def engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LlamaEngine]:
    path = tiny_model_path(tmp_path_factory.getbasetemp() / "models")
    eng = await LlamaEngine.load(path, n_ctx=ENGINE_CTX)
    yield eng
    await eng.aclose()


@dataclass
class Mesh:
    base_url: str  # ends in /v1
    engine: LlamaEngine
    provider: ProviderNode

    def sdk(self, api_key: str = "unused", **kw: Any) -> openai.OpenAI:
        # No retries: a test must see the first answer, not a retried one.
        return openai.OpenAI(
            base_url=self.base_url, api_key=api_key, max_retries=0, timeout=SDK_TIMEOUT_S, **kw
        )

    @property
    def model_id(self) -> str:
        return self.engine.info.model_id


@asynccontextmanager
async def running_mesh(
    engine: LlamaEngine, api_key: str | None = None, *, routed: bool = False
) -> AsyncIterator[Mesh]:
    async with provider_node(engine, identity=NodeIdentity.generate()) as prov:
        async with client_node(allow_insecure=True) as client:
            advert = await client.connect(prov.addrs[0])
            backend: CompletionBackend = (
                RoutedBackend(client) if routed else SingleProviderBackend(client, advert)
            )
            async with trio.open_nursery() as nursery:
                url = await nursery.start(
                    partial(serve_api, backend, "127.0.0.1", 0, api_key=api_key)
                )
                yield Mesh(f"{url}/v1", engine, prov)
                nursery.cancel_scope.cancel()


@pytest.fixture
async def mesh(engine: LlamaEngine) -> AsyncIterator[Mesh]:
    async with running_mesh(engine) as m:
        yield m


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking SDK call off the trio loop that serves it."""
    return await trio.to_thread.run_sync(fn)


def steady_body(engine: LlamaEngine) -> dict[str, Any]:
    """Greedy, with byte/control tokens banned: the same text every time, never ending early."""
    return {"seed": 7, "logit_bias": {str(k): v for k, v in steady_logit_bias(engine).items()}}


async def engine_text(engine: LlamaEngine, prompt: str, max_tokens: int,
                      stop: tuple[str, ...] = ()) -> str:
    """What llama.cpp itself answers for the same request: the reference output."""
    params = SamplingParams.from_dict(
        {"temperature": 0.0, "seed": 7, "logit_bias": steady_logit_bias(engine),
         "stop": list(stop)}
    )
    pieces = []
    async with engine.stream(prompt, params, max_tokens) as gen:
        async for chunk in gen:
            pieces.append(chunk.text)
    return "".join(pieces)


CHAT: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "hello world"},
]


def chat_prompt() -> tuple[str, tuple[str, ...]]:
    # The tiny GGUF has no chat template, so its provider advertises the "qa" format of
    # base models, and the endpoint must format chats that way.
    return render_chat([ChatMessage(m["role"], str(m.get("content"))) for m in CHAT], "qa")


async def test_models_list_shows_the_providers_model(mesh: Mesh) -> None:
    page = await in_thread(lambda: mesh.sdk().models.list())
    assert [m.id for m in page.data] == [mesh.model_id]
    extra = page.data[0].model_extra or {}
    assert extra["meshnode"]["name"] == mesh.engine.info.name
    assert extra["meshnode"]["providers"] == 1
    assert extra["meshnode"]["context_length"] == ENGINE_CTX


async def test_chat_completion_answers_with_the_models_text_and_usage(mesh: Mesh) -> None:
    res = await in_thread(lambda: mesh.sdk().chat.completions.create(
        model=mesh.model_id, messages=CHAT, max_tokens=12, temperature=0,
        extra_body=steady_body(mesh.engine),
    ))
    prompt, stop = chat_prompt()
    assert res.object == "chat.completion"
    assert res.choices[0].message.role == "assistant"
    assert res.choices[0].message.content == await engine_text(mesh.engine, prompt, 12, stop)
    assert res.choices[0].finish_reason == "length"
    assert res.usage is not None
    assert res.usage.completion_tokens == 12
    assert res.usage.prompt_tokens == await mesh.engine.count_tokens(prompt)
    assert res.usage.total_tokens == res.usage.prompt_tokens + 12


async def test_answers_name_the_provider_and_flag_a_provider_without_tee(mesh: Mesh) -> None:
    res = await in_thread(lambda: mesh.sdk().chat.completions.create(
        model=mesh.model_id, messages=CHAT, max_tokens=2,
    ))
    extra = res.model_extra or {}
    assert extra["meshnode"]["provider"] == mesh.provider.peer_id
    assert extra["meshnode"]["insecure"] is True
    assert extra["meshnode"]["notice"] == INSECURE_NOTICE


async def test_chat_stream_delivers_the_same_text_and_usage_counts_every_token(
    mesh: Mesh,
) -> None:
    def run() -> list[Any]:
        stream = mesh.sdk().chat.completions.create(
            model=mesh.model_id, messages=CHAT, max_tokens=20, temperature=0,
            stream=True, stream_options={"include_usage": True},
            extra_body=steady_body(mesh.engine),
        )
        return list(stream)

    chunks = await in_thread(run)
    prompt, stop = chat_prompt()
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices
               and c.choices[0].delta.content]
    assert "".join(content) == await engine_text(mesh.engine, prompt, 20, stop)
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    # The last chunk carries only usage. A delta holds one token or, when the provider
    # batched tokens the engine produced while it was sending, several.
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 20
    assert 1 <= len(content) <= 20
    assert usage_chunk.usage.prompt_tokens == await mesh.engine.count_tokens(prompt)
    assert len({c.id for c in chunks}) == 1


async def test_chat_stream_without_include_usage_sends_no_usage(mesh: Mesh) -> None:
    def run() -> list[Any]:
        return list(mesh.sdk().chat.completions.create(
            model=mesh.model_id, messages=CHAT, max_tokens=4, stream=True,
        ))

    chunks = await in_thread(run)
    assert chunks and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason is not None


async def test_completion_answers_with_the_models_text(mesh: Mesh) -> None:
    res = await in_thread(lambda: mesh.sdk().completions.create(
        model=mesh.model_id, prompt="the river", max_tokens=10, temperature=0,
        extra_body=steady_body(mesh.engine),
    ))
    assert res.object == "text_completion"
    assert res.choices[0].text == await engine_text(mesh.engine, "the river", 10)
    assert res.choices[0].finish_reason == "length"
    assert res.usage is not None and res.usage.completion_tokens == 10
    assert res.usage.prompt_tokens == await mesh.engine.count_tokens("the river")


async def test_completion_stream_matches_and_ends_with_usage(mesh: Mesh) -> None:
    def run() -> list[Any]:
        return list(mesh.sdk().completions.create(
            model=mesh.model_id, prompt="the river", max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body=steady_body(mesh.engine),
        ))

    chunks = await in_thread(run)
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == await engine_text(mesh.engine, "the river", 10)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert 1 <= len(texts) <= 10


async def test_the_model_can_be_named_by_its_name(mesh: Mesh) -> None:
    name = mesh.engine.info.name
    res = await in_thread(lambda: mesh.sdk().completions.create(
        model=name, prompt="hi", max_tokens=2,
    ))
    assert res.model == name
    assert (res.model_extra or {})["meshnode"]["model_id"] == mesh.model_id


async def test_the_routed_backend_serves_the_same_answer_through_the_router(
    engine: LlamaEngine,
) -> None:
    async with running_mesh(engine, routed=True) as mesh:
        page = await in_thread(lambda: mesh.sdk().models.list())
        assert [m.id for m in page.data] == [mesh.model_id]
        res = await in_thread(lambda: mesh.sdk().chat.completions.create(
            model=mesh.engine.info.name, messages=CHAT, max_tokens=8, temperature=0,
            extra_body=steady_body(mesh.engine),
        ))
    prompt, stop = chat_prompt()
    assert res.choices[0].message.content == await engine_text(engine, prompt, 8, stop)
    assert res.usage is not None and res.usage.completion_tokens == 8
    extra = res.model_extra or {}
    assert extra["meshnode"]["provider"] == mesh.provider.peer_id
    assert extra["meshnode"]["insecure"] is True


async def test_unknown_model_is_404_in_openai_error_shape(mesh: Mesh) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await in_thread(lambda: mesh.sdk().chat.completions.create(
            model="no-such-model", messages=CHAT, max_tokens=2,
        ))
    assert info.value.status_code == 404
    body = info.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["param"] == "model"
    assert "no-such-model" in body["error"]["message"]


async def test_more_than_one_choice_is_refused_with_400(mesh: Mesh) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await in_thread(lambda: mesh.sdk().chat.completions.create(
            model=mesh.model_id, messages=CHAT, max_tokens=2, n=2,
        ))
    error = info.value.response.json()["error"]
    assert error["param"] == "n"
    assert error["type"] == "invalid_request_error"
    assert mesh.provider.jobs.stats.jobs_started == 0  # refused before any provider work


async def test_bearer_key_is_required_when_set(engine: LlamaEngine) -> None:
    async with running_mesh(engine, api_key=None) as open_mesh:
        await in_thread(lambda: open_mesh.sdk().models.list())  # no key configured: open
    async with running_mesh(engine, api_key="s3cret") as mesh:
        page = await in_thread(lambda: mesh.sdk(api_key="s3cret").models.list())
        assert [m.id for m in page.data] == [mesh.model_id]
        for wrong in ("wrong", "s3cret-but-longer"):
            sdk = mesh.sdk(api_key=wrong)
            with pytest.raises(openai.AuthenticationError) as info:
                await in_thread(sdk.models.list)
            assert info.value.status_code == 401
            assert info.value.response.json()["error"]["code"] == "invalid_api_key"


async def test_client_leaving_mid_stream_stops_the_provider(mesh: Mesh) -> None:
    def read_two_chunks_then_leave() -> int:
        stream = mesh.sdk().chat.completions.create(
            model=mesh.model_id, messages=CHAT, max_tokens=4000, temperature=0,
            stream=True, extra_body=steady_body(mesh.engine),
        )
        seen = 0
        for _ in stream:
            seen += 1
            if seen == 2:
                break
        stream.close()
        return seen

    assert await in_thread(read_two_chunks_then_leave) == 2
    # The provider ends the job (counts it, closes its stream) and its engine is free: the
    # stream's exit waited for the decode thread to stop, so nothing decodes any more.
    with trio.fail_after(10):
        await mesh.provider.jobs.wait_quiet()
    assert not mesh.engine.busy
    assert mesh.engine.decoded_tokens_total < 4000
    assert mesh.provider.jobs.stats.jobs_cancelled == 1
