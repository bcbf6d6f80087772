"""One completion served over HTTP: as a single JSON body or as server-sent events.

The job runs next to a watcher of the HTTP connection; when the client disconnects, or
stops reading for ``SEND_TIMEOUT_S``, the job is cancelled, which resets its libp2p
stream so the provider stops generating (and billing) at once.

Response headers are held back until the first token: an error before any text (no
provider, bad parameters, busy) still gets its proper HTTP status and OpenAI error body.
After the first token the status is committed, so a later failure is sent as one
``data: {"error": ...}`` event, which OpenAI's SDKs raise as an ``APIError``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import trio
from starlette.types import Message, Receive, Scope, Send

from meshnode.api.backend import BackendError, CompletionBackend, CompletionResult
from meshnode.api.errors import ApiError
from meshnode.api.openai_request import ParsedRequest
from meshnode.api.openai_response import ResponseShaper

log = logging.getLogger(__name__)

# A client that has not taken a chunk in 30 s is not reading; free the provider for others.
SEND_TIMEOUT_S = 30.0

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    # Reverse proxies (nginx) buffer responses by default, which would hold tokens back.
    (b"x-accel-buffering", b"no"),
]


def encode_json(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


async def send_json(send: Send, status: int, body: Any,
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": _JSON_HEADERS + (headers or [])})
    await send({"type": "http.response.body", "body": encode_json(body), "more_body": False})


def _backend_api_error(exc: BackendError) -> ApiError:
    return ApiError(exc.http_status, exc.message, code=exc.code, retry_after=exc.retry_after)


class CompletionRun:
    """An ASGI app answering one parsed completion request."""

    def __init__(self, backend: CompletionBackend, parsed: ParsedRequest, shaper: ResponseShaper):
        self._backend = backend
        self._parsed = parsed
        self._shaper = shaper

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with trio.open_nursery() as nursery:
            # Lives exactly as long as the request: its wait ends with the connection.
            nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
            sender = _Sender(send, nursery.cancel_scope)
            if self._parsed.stream:
                await self._stream(sender)
            else:
                await self._whole(sender)
            nursery.cancel_scope.cancel()
        if nursery.cancel_scope.cancelled_caught and not sender.finished:
            log.info("HTTP client left; job for %s cancelled", self._parsed.card.name)

    async def _complete(self, on_text: Any) -> CompletionResult | ApiError:
        try:
            return await self._backend.complete(self._parsed.request, on_text)
        except BackendError as exc:
            return _backend_api_error(exc)
        except Exception:  # a backend bug must not take the server down with it
            log.exception("completion backend failed")
            return ApiError(500, "the completion backend failed unexpectedly",
                            code="internal_error")

    async def _whole(self, sender: _Sender) -> None:
        outcome = await self._complete(None)
        if isinstance(outcome, ApiError):
            await sender.json(outcome.status, outcome.body(), outcome.headers())
        else:
            await sender.json(200, self._shaper.full(outcome))

    async def _stream(self, sender: _Sender) -> None:
        shaper = self._shaper

        async def on_text(text: str) -> None:
            await self._begin_stream(sender)
            await sender.event(shaper.text_chunk(text))

        outcome = await self._complete(on_text)
        if isinstance(outcome, ApiError):
            if not sender.started:
                await sender.json(outcome.status, outcome.body(), outcome.headers())
            else:
                await sender.event(outcome.body())
                await sender.end()
            return
        await self._begin_stream(sender)
        for chunk in shaper.closing_chunks(outcome):
            await sender.event(chunk)
        await sender.raw(b"data: [DONE]\n\n")
        await sender.end()

    async def _begin_stream(self, sender: _Sender) -> None:
        if sender.started:
            return
        await sender.start(200, _SSE_HEADERS)
        for chunk in self._shaper.opening_chunks():
            await sender.event(chunk)


class _Sender:
    """ASGI send with a deadline: a client that stops reading cancels the whole run."""

    def __init__(self, send: Send, run_scope: trio.CancelScope) -> None:
        self._send = send
        self._run_scope = run_scope
        self.started = False
        self.finished = False

    async def _put(self, message: Message) -> None:
        with trio.move_on_after(SEND_TIMEOUT_S) as timer:
            await self._send(message)
        if timer.cancelled_caught:
            # Cancel rather than raise: an exception inside the job's text callback would
            # be reported as a provider failure, a cancellation resets the job's stream.
            log.info("HTTP client stopped reading for %.0f s; cancelling", SEND_TIMEOUT_S)
            self._run_scope.cancel()
            await trio.lowlevel.checkpoint()

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        await self._put({"type": "http.response.start", "status": status, "headers": headers})

    async def raw(self, data: bytes) -> None:
        await self._put({"type": "http.response.body", "body": data, "more_body": True})

    async def event(self, body: Any) -> None:
        await self.raw(b"data: " + encode_json(body) + b"\n\n")

    async def end(self) -> None:
        await self._put({"type": "http.response.body", "body": b"", "more_body": False})
        self.finished = True

    async def json(self, status: int, body: Any,
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await self.start(status, _JSON_HEADERS + (headers or []))
        await self._put({"type": "http.response.body", "body": encode_json(body),
                         "more_body": False})
        self.finished = True


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            scope.cancel()
            return
