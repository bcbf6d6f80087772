"""Where the endpoint may listen, and how its HTTP layer answers whatever a backend does.

The HTTP behaviour here is checked against a scripted ``CompletionBackend``: the protocol
is the seam between the HTTP layer and the mesh, and a script is the only way to make a
backend fail at an exact point (after the first token, say). The real mesh behind the
same seam is covered in test_api_endpoint.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import pytest
import trio

from meshnode.api.app import MAX_BODY_BYTES
from meshnode.api.backend import (
    NO_PROVIDER,
    PROVIDER_FAILED,
    BackendError,
    CompletionRequest,
    CompletionResult,
    ModelCard,
    OnText,
)
from meshnode.api.server import BindRefused, check_bind, is_loopback, parse_listen, serve_api

CARD = ModelCard(id="c" * 64, name="scripted", quant="Q4_K_M", ctx=2048, providers=1,
                 verified_providers=1, price_prompt_per_1k=10, price_completion_per_1k=20,
                 chat_format="generic")


class ScriptedBackend:
    """Streams ``pieces``, then fails with ``error`` if set, else returns a result."""

    def __init__(self, pieces: list[str], error: BackendError | None = None) -> None:
        self.pieces = pieces
        self.error = error
        self.requests: list[CompletionRequest] = []

    def list_models(self) -> list[ModelCard]:
        return [CARD]

    async def complete(self, req: CompletionRequest, on_text: OnText | None) -> CompletionResult:
        self.requests.append(req)
        for piece in self.pieces:
            if on_text is not None:
                await on_text(piece)
        if self.error is not None:
            raise self.error
        return CompletionResult(
            text="".join(self.pieces), finish_reason="stop", prompt_tokens=3,
            completion_tokens=len(self.pieces), cost_nanoton=70, provider="12D3KooWscripted",
            insecure=False,
        )


@asynccontextmanager
async def served(backend: ScriptedBackend) -> AsyncIterator[httpx.AsyncClient]:
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(serve_api, backend, "127.0.0.1", 0))
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            yield http
        nursery.cancel_scope.cancel()


def sse_events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events)
    return [e[len("data: "):] for e in events]


CHAT = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}


# ---------------------------------------------------------------- listen address


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_addresses_are_loopback(host: str) -> None:
    assert is_loopback(host)
    check_bind(host, allow_remote=False, api_key=None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.1"])
def test_a_non_loopback_bind_needs_the_explicit_flag_and_a_key(host: str) -> None:
    with pytest.raises(BindRefused, match="not a loopback"):
        check_bind(host, allow_remote=False, api_key="k")
    with pytest.raises(BindRefused, match="API key"):
        check_bind(host, allow_remote=True, api_key=None)
    check_bind(host, allow_remote=True, api_key="k")


async def test_serve_api_refuses_a_public_bind_before_listening() -> None:
    with pytest.raises(BindRefused):
        await serve_api(ScriptedBackend([]), "0.0.0.0", 0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:8080", ("127.0.0.1", 8080)), ("[::1]:0", ("::1", 0)),
     ("localhost:9", ("localhost", 9))],
)
def test_listen_addresses_parse(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["8080", "host:", ":80", "h:99999", "h:x"])
def test_bad_listen_addresses_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(value)


async def test_setting_the_shutdown_event_stops_the_server() -> None:
    shutdown = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(
                partial(serve_api, ScriptedBackend([]), "127.0.0.1", 0, shutdown=shutdown)
            )
            async with httpx.AsyncClient(base_url=url, timeout=5) as http:
                assert (await http.get("/v1/models")).status_code == 200
            shutdown.set()
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("/v1/models")


# ---------------------------------------------------------------- HTTP behaviour


async def test_a_stream_is_sse_events_ending_with_done() -> None:
    async with served(ScriptedBackend(["Hel", "lo"])) as http:
        resp = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["", "Hel", "lo", None]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["meshnode"]["cost_nanoton"] == 70
    assert "notice" not in chunks[-1]["meshnode"]  # this provider ran in a TEE


async def test_an_error_before_the_first_token_keeps_its_http_status() -> None:
    backend = ScriptedBackend([], BackendError(NO_PROVIDER, "nobody serves scripted"))
    async with served(backend) as http:
        resp = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status_code == 503
    assert resp.json()["error"] == {
        "message": "nobody serves scripted", "type": "service_unavailable_error",
        "param": None, "code": NO_PROVIDER,
    }


async def test_an_error_after_the_first_token_is_an_error_event_without_done() -> None:
    backend = ScriptedBackend(["partial"], BackendError(PROVIDER_FAILED, "provider vanished"))
    async with served(backend) as http:
        resp = await http.post("/v1/completions",
                               json={"model": "scripted", "prompt": "x", "stream": True})
    assert resp.status_code == 200
    events = sse_events(resp.text)
    assert json.loads(events[0])["choices"][0]["text"] == "partial"
    assert json.loads(events[-1])["error"]["code"] == PROVIDER_FAILED
    assert "[DONE]" not in events


async def test_a_backend_bug_is_a_500_in_openai_shape() -> None:
    class Broken(ScriptedBackend):
        async def complete(self, req: CompletionRequest,
                           on_text: OnText | None) -> CompletionResult:
            raise RuntimeError("bug")

    async with served(Broken([])) as http:
        resp = await http.post("/v1/chat/completions", json=CHAT)
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "internal_error"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
     ("GET", "/v1/models/unknown", 404)],
)
async def test_unknown_routes_and_methods_answer_in_openai_shape(
    method: str, path: str, status: int
) -> None:
    async with served(ScriptedBackend([])) as http:
        resp = await http.request(method, path)
    assert resp.status_code == status
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


async def test_a_model_can_be_retrieved_by_name() -> None:
    async with served(ScriptedBackend([])) as http:
        resp = await http.get("/v1/models/scripted")
    assert resp.status_code == 200
    assert resp.json()["id"] == CARD.id
    assert resp.json()["meshnode"]["price_completion_nanoton_per_1k"] == 20


async def test_malformed_json_is_a_400() -> None:
    async with served(ScriptedBackend([])) as http:
        resp = await http.post("/v1/chat/completions", content=b"{not json",
                               headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "invalid_json"


async def test_an_oversized_body_is_refused_unread() -> None:
    backend = ScriptedBackend([])
    async with served(backend) as http:
        resp = await http.post("/v1/completions", content=b" " * (MAX_BODY_BYTES + 1),
                               headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert backend.requests == []


async def test_validation_errors_reach_the_client_before_any_backend_call() -> None:
    backend = ScriptedBackend(["x"])
    async with served(backend) as http:
        resp = await http.post("/v1/chat/completions", json={**CHAT, "n": 3})
    body: dict[str, Any] = resp.json()
    assert resp.status_code == 400 and body["error"]["param"] == "n"
    assert backend.requests == []
