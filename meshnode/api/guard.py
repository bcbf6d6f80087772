"""Keeps web pages and floods off the local endpoint, before any route runs.

A browser will send a "simple" cross-site request (a ``text/plain`` POST) to
``http://127.0.0.1:8080`` from any page the user opens, and a DNS-rebinding page
(``rebind.evil.example`` resolving to 127.0.0.1) can even read the answers. The endpoint
spends the user's money, so every HTTP request must pass:

- ``Host`` names a loopback address or name, or the host the API was bound to. A
  rebinding page's requests carry its own name and are refused (403). The port is not
  checked: the name is what a rebinding attacker cannot forge.
- ``Origin``, when present, is a loopback page (a local UI). SDKs and curl send none and
  pass; a foreign page, or ``null`` (sandboxed frames, files), is refused (403).
- A POST declares ``Content-Type: application/json``. That makes a cross-site POST a
  non-simple request, which browsers preflight, and we answer no preflight (415).
- At most ``MAX_IN_FLIGHT_REQUESTS`` at once; more get 503 with Retry-After at once,
  so a flood costs a fixed amount of memory and the requests already admitted finish.

With a non-loopback bind (``allow_remote``, API key required) the Host check is off: the
machine's names cannot be listed, and a rebinding page cannot send the key.

Not verified: anything a local process does; it can reach the socket directly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from meshnode.api.completion_run import send_json
from meshnode.api.errors import ApiError

# A local client (an SDK's pool, an agent framework) keeps tens of requests open; each
# admitted one can hold a body of up to MAX_BODY_BYTES while it parses, so 256 bounds the
# endpoint's memory (~1 GiB worst case) while every provider queue stays full.
MAX_IN_FLIGHT_REQUESTS = 256
# What a refused client waits before retrying: about one short job on a busy provider.
BUSY_RETRY_AFTER_S = 1.0
# Names that always mean this machine (RFC 6761 reserves "localhost").
LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
# Enough for any real Host or Origin header; longer ones are refused unparsed.
MAX_HOST_HEADER_BYTES = 512


def _hostname(authority: str) -> str | None:
    """The host part of ``host[:port]`` or ``[v6][:port]``, lower-cased; None if bad."""
    try:
        parsed = urlsplit("//" + authority)
        host = parsed.hostname
        parsed.port  # noqa: B018  (raises ValueError on a bad port)
    except ValueError:
        return None
    return host.lower() if host else None


def is_loopback_name(host: str) -> bool:
    """True for loopback literals (127.0.0.0/8, ::1) and ``localhost`` names, without DNS."""
    if host in LOOPBACK_NAMES or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RequestGuard:
    """ASGI middleware applying the checks above to every HTTP request."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: Iterable[str] | None,
        max_in_flight: int = MAX_IN_FLIGHT_REQUESTS,
    ) -> None:
        self._app = app
        # None: any Host (a remote bind, protected by its API key).
        self._hosts = (
            None if allowed_hosts is None
            else frozenset(h.strip("[]").lower() for h in allowed_hosts)
        )
        self._max_in_flight = max_in_flight
        self.in_flight = 0

    def _host_allowed(self, host: str) -> bool:
        return is_loopback_name(host) or (self._hosts is not None and host in self._hosts)

    def refusal(self, scope: Scope) -> ApiError | None:
        """Why this request is refused, or None to let it through."""
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            headers.setdefault(name, value)  # the first of repeated headers counts
        host_header = headers.get(b"host", b"")
        if self._hosts is not None:
            host = (_hostname(host_header.decode("latin-1"))
                    if 0 < len(host_header) <= MAX_HOST_HEADER_BYTES else None)
            if host is None or not self._host_allowed(host):
                return ApiError(403, "the Host header does not name this local endpoint "
                                "(DNS rebinding?)", code="forbidden_host")
        origin = headers.get(b"origin")
        if origin is not None:
            host = None
            if len(origin) <= MAX_HOST_HEADER_BYTES:
                parts = urlsplit(origin.decode("latin-1"))
                if parts.scheme in ("http", "https"):
                    host = _hostname(parts.netloc)
            if host is None or not self._host_allowed(host):
                return ApiError(403, "requests from web pages of other origins are refused",
                                code="forbidden_origin")
        if scope["method"] == "POST":
            media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
            if media != b"application/json":
                return ApiError(415, "send the body as JSON with 'Content-Type: "
                                "application/json'", code="unsupported_media_type")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        refused = self.refusal(scope)
        if refused is None and self.in_flight >= self._max_in_flight:
            refused = ApiError(503, f"the endpoint is serving {self._max_in_flight} requests; "
                               "retry shortly", code="busy", retry_after=BUSY_RETRY_AFTER_S)
        if refused is not None:
            await send_json(send, refused.status, refused.body(), refused.headers())
            return
        self.in_flight += 1
        try:
            await self._app(scope, receive, send)
        finally:
            self.in_flight -= 1
