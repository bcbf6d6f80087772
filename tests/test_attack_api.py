"""Attacks on the local OpenAI endpoint: web pages, DNS rebinding, deep JSON, floods.

The backend is a scripted ``CompletionBackend`` (the seam the real mesh sits behind, as
in test_api_server.py): these are attacks on the HTTP layer, and the script lets a test
hold jobs open to fill the endpoint. After each attack a legitimate SDK-style request
(JSON, no Origin, loopback Host) must still get its completion.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import httpx
import pytest
import trio

from meshnode.api.backend import CompletionRequest, CompletionResult, ModelCard, OnText
from meshnode.api.guard import MAX_IN_FLIGHT_REQUESTS
from meshnode.api.server import serve_api

CARD = ModelCard(id="a" * 64, name="scripted", quant="Q4_K_M", ctx=2048, providers=1,
                 verified_providers=1, price_prompt_per_1k=0, price_completion_per_1k=0,
                 chat_format="generic")
CHAT = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}


class HeldBackend:
    """Answers "ok"; while ``hold`` is set each job waits for ``release`` first."""

    def __init__(self) -> None:
        self.calls = 0
        self.hold = False
        self.release = trio.Event()

    def list_models(self) -> list[ModelCard]:
        return [CARD]

    async def complete(self, req: CompletionRequest, on_text: OnText | None) -> CompletionResult:
        self.calls += 1
        if self.hold:
            await self.release.wait()
        return CompletionResult(text="ok", finish_reason="stop", prompt_tokens=1,
                                completion_tokens=1, cost_nanoton=0, provider="12D3KooWx",
                                insecure=False)


@asynccontextmanager
async def served(backend: HeldBackend) -> AsyncIterator[httpx.AsyncClient]:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_api, backend, "127.0.0.1", 0))
        limits = httpx.Limits(max_connections=MAX_IN_FLIGHT_REQUESTS + 64)
        async with httpx.AsyncClient(base_url=url, timeout=20, limits=limits) as http:
            yield http
        nursery.cancel_scope.cancel()


async def legit_request_completes(http: httpx.AsyncClient) -> None:
    resp = await http.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == "ok"


def openai_error(resp: httpx.Response) -> str:
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    return str(resp.json()["error"]["code"])


async def test_a_web_pages_text_plain_post_is_refused_and_never_runs_a_job() -> None:
    backend = HeldBackend()
    async with served(backend) as http:
        resp = await http.post("/v1/chat/completions", content=b'{"model":"scripted",'
                               b'"messages":[{"role":"user","content":"hi"}]}',
                               headers={"content-type": "text/plain",
                                        "origin": "https://evil.example"})
        assert resp.status_code == 403 and openai_error(resp) == "forbidden_origin"
        # Without an Origin (a form post from a file, a stripped header) the type still bars it.
        resp = await http.post("/v1/chat/completions", content=b"{}",
                               headers={"content-type": "text/plain"})
        assert resp.status_code == 415 and openai_error(resp) == "unsupported_media_type"
        assert backend.calls == 0
        await legit_request_completes(http)


@pytest.mark.parametrize("host", ["rebind.evil.example", "rebind.evil.example:8080",
                                  "192.168.1.7:8080", "", "[bad"])
async def test_a_dns_rebinding_host_is_refused(host: str) -> None:
    backend = HeldBackend()
    async with served(backend) as http:
        resp = await http.post("/v1/chat/completions", json=CHAT, headers={"host": host})
        assert resp.status_code == 403 and openai_error(resp) == "forbidden_host"
        resp = await http.get("/v1/models", headers={"host": host})
        assert resp.status_code == 403  # the model list is not readable either
        assert backend.calls == 0
        await legit_request_completes(http)


@pytest.mark.parametrize("host", ["localhost:8080", "127.0.0.1", "[::1]:8080", "LOCALHOST"])
async def test_loopback_hosts_are_served(host: str) -> None:
    async with served(HeldBackend()) as http:
        resp = await http.post("/v1/chat/completions", json=CHAT, headers={"host": host})
    assert resp.status_code == 200


@pytest.mark.parametrize(("origin", "status"), [
    ("https://evil.example", 403), ("null", 403), ("http://localhost.evil.example", 403),
    ("file://", 403), ("http://localhost:3000", 200), ("http://127.0.0.1:5173", 200),
])
async def test_only_loopback_web_origins_may_call(origin: str, status: int) -> None:
    async with served(HeldBackend()) as http:
        resp = await http.post("/v1/chat/completions", json=CHAT, headers={"origin": origin})
    assert resp.status_code == status


@pytest.mark.parametrize("depth", [100_000, 990])
async def test_deeply_nested_json_is_a_400_not_a_500(depth: int) -> None:
    # 100k: json.loads itself recurses too deep; 990: it parses, and the request's
    # validation walks the rest of the way to the recursion limit.
    nested = "[" * depth + "]" * depth
    body = '{"model":"scripted","messages":[{"role":"user","content":' + nested + "}]}"
    backend = HeldBackend()
    async with served(backend) as http:
        resp = await http.post("/v1/chat/completions", content=body.encode(),
                               headers={"content-type": "application/json"})
        assert resp.status_code == 400, resp.text
        assert openai_error(resp) in ("invalid_json", "invalid_request")
        await legit_request_completes(http)


async def test_a_flood_past_the_in_flight_cap_gets_503_with_retry_after_and_the_rest_finish(
) -> None:
    backend = HeldBackend()
    backend.hold = True
    extra = 16
    statuses: list[int] = []
    retry_after: list[str | None] = []
    async with served(backend) as http:

        async def one() -> None:
            resp = await http.post("/v1/chat/completions", json=CHAT)
            statuses.append(resp.status_code)
            if resp.status_code == 503:
                retry_after.append(resp.headers.get("retry-after"))
                assert openai_error(resp) == "busy"

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(MAX_IN_FLIGHT_REQUESTS + extra):
                    nursery.start_soon(one)
                while len(statuses) < extra:  # the overflow is refused without waiting
                    await trio.sleep(0.05)
                assert statuses == [503] * extra
                backend.release.set()
        backend.hold = False
        await legit_request_completes(http)
    assert statuses.count(200) == MAX_IN_FLIGHT_REQUESTS
    assert retry_after == ["1"] * extra
