"""The OpenAI-compatible HTTP app of a light client (Starlette, run on trio).

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/chat/completions``,
``POST /v1/completions``. Every error, including 404/405 for unknown routes and 401 for a
wrong key, is an OpenAI error body.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import trio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from meshnode.api.backend import CompletionBackend
from meshnode.api.completion_run import CompletionRun, send_json
from meshnode.api.errors import ApiError, bad_request
from meshnode.api.guard import RequestGuard
from meshnode.api.openai_request import (
    ParsedRequest,
    parse_chat_request,
    parse_completion_request,
)
from meshnode.api.openai_response import Kind, ResponseShaper, model_body

log = logging.getLogger(__name__)

# The largest prompt a job carries (512 Ki characters) can triple in UTF-8 and grow six
# times as JSON \u escapes; 4 MiB holds any real prompt and refuses a memory flood.
MAX_BODY_BYTES = 4 * 1024 * 1024
# A request body arrives in one go from a local client; 30 s means it is stuck.
BODY_READ_TIMEOUT_S = 30.0


async def read_json_body(request: Request) -> Any:
    """The request's JSON, read with a size cap and a deadline."""
    chunks: list[bytes] = []
    size = 0
    try:
        with trio.fail_after(BODY_READ_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes",
                                   code="request_too_large")
                chunks.append(chunk)
    except trio.TooSlowError as exc:
        raise ApiError(408, "the request body did not arrive in time",
                       code="request_timeout") from exc
    try:
        return json.loads(b"".join(chunks))
    except RecursionError as exc:
        raise too_deep() from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly.)",
            code="invalid_json",
        ) from exc


def too_deep() -> ApiError:
    """400 for JSON nested past what the parser (or our walk over it) can recurse into."""
    return bad_request("the JSON body is nested too deeply", code="invalid_json")


def create_app(
    backend: CompletionBackend,
    *,
    api_key: str | None = None,
    allowed_hosts: Iterable[str] | None = (),
) -> ASGIApp:
    """The ASGI app; with ``api_key`` set every request must carry it as a bearer token.
    Requests must name a loopback host or one of ``allowed_hosts`` (None: any host, for a
    remote bind with a key), come from no foreign web page and POST JSON (api/guard.py).
    """

    async def list_models(request: Request) -> Response:
        data = [model_body(card) for card in backend.list_models()]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(request: Request) -> Response:
        wanted = request.path_params["model"]
        for card in backend.list_models():
            if wanted in (card.id, card.name):
                return JSONResponse(model_body(card))
        raise ApiError(404, f"The model '{wanted}' does not exist", param="model",
                       code="model_not_found")

    def completion_endpoint(
        kind: Kind, parse: Callable[[object, list[Any]], ParsedRequest]
    ) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            body = await read_json_body(request)
            try:
                parsed = parse(body, backend.list_models())
            except RecursionError as exc:  # json.loads stops short of this depth only just
                raise too_deep() from exc
            shaper = ResponseShaper(
                kind=kind,
                model=parsed.requested_model,
                card=parsed.card,
                created=int(time.time()),
                include_usage=parsed.include_usage,
            )
            # Any ASGI app can answer a Starlette route; this one runs the job itself.
            return cast(Response, CompletionRun(backend, parsed, shaper))

        return endpoint

    app = Starlette(
        routes=[
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", get_model, methods=["GET"]),
            Route("/v1/chat/completions", completion_endpoint("chat", parse_chat_request),
                  methods=["POST"]),
            Route("/v1/completions", completion_endpoint("completion", parse_completion_request),
                  methods=["POST"]),
        ],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            ClientDisconnect: _client_disconnect,
            Exception: _internal_error,
        },
    )
    authed: ASGIApp = app if api_key is None else BearerAuth(app, api_key)
    return RequestGuard(authed, allowed_hosts=allowed_hosts)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    headers = {name.decode(): value.decode() for name, value in exc.headers()}
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"no route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code,
                        headers=exc.headers)


async def _client_disconnect(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; ends the request quietly


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    error = ApiError(500, "internal error in the meshnode API", code="internal_error")
    return JSONResponse(error.body(), status_code=500)


class BearerAuth:
    """Refuses HTTP requests without ``Authorization: Bearer <key>`` (401, OpenAI shape)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        if not api_key:
            raise ValueError("an empty API key would accept anyone; pass None for no key")
        self._app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            # Constant time, so the key cannot be guessed byte by byte from timings.
            if not hmac.compare_digest(given, self._expected):
                error = ApiError(
                    401,
                    "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                )
                await send_json(send, 401, error.body())
                return
        await self._app(scope, receive, send)
