"""`ask` through an already running light client (`meshnode client`): the warm path.

A cold `ask` spends about two seconds importing py-libp2p before it can dial anyone. A
running `meshnode client` has all of that loaded and its mesh view warm, so `ask` can
stream from its OpenAI-compatible endpoint instead, importing only the standard library.

The client announces itself in ``<home>/client/api.json`` (``STATE_FILE``): its API's
URL, the API key if it requires one, its pid and whether it admits dev providers
(``--insecure``). The file is created with mode 0600 (it may hold the key) and removed
when the client exits; a client killed with SIGKILL leaves it behind, so a reader checks
that the pid is alive, and falls back to its own node when anything is off.

Standard library only: this module is imported before the first token of every `ask`.

Not verified: that the process listening on the port is the client that wrote the file
(a pid reused by another program with a socket on the same port would get the prompt).
The file is only trusted when it lives in the user's own 0600 state and names a loopback
URL, so only a local process of the same user could arrange that.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

STATE_FILE = Path("client") / "api.json"
# The state file is a few hundred bytes; a larger one is not ours.
MAX_STATE_BYTES = 64 * 1024
# Connecting to a listening loopback socket takes microseconds; 2 s means it is wedged.
CONNECT_TIMEOUT_S = 2.0
# Longest silence between two reads of the answer: the client's routed job has its own
# deadlines and failover (tens of seconds); past this the client is stuck, not slow.
READ_TIMEOUT_S = 300.0
# One server-sent event is one chunk of a few tokens (a few hundred bytes of JSON).
MAX_EVENT_BYTES = 1024 * 1024
# An error body is a short OpenAI error object.
MAX_ERROR_BODY_BYTES = 64 * 1024
# Shown of the client's error message: it may quote a provider.
MAX_MESSAGE_CHARS = 500
# Error codes of the API (api/backend.py) that mean "nobody can serve this model now".
NO_PROVIDER_CODES = frozenset({"no_provider", "model_not_found", "provider_busy"})


@dataclass(frozen=True)
class ClientState:
    """What a running `meshnode client` writes about its API."""

    url: str  # e.g. http://127.0.0.1:8080, as serve_api reports it
    pid: int
    insecure: bool  # it admits providers without a TEE
    api_key: str | None = None

    def to_json(self) -> str:
        return json.dumps({"url": self.url, "pid": self.pid, "insecure": self.insecure,
                           "api_key": self.api_key})


def state_path(home: Path) -> Path:
    return home / STATE_FILE


def write_state(home: Path, state: ClientState) -> Path:
    """Write the state file atomically with mode 0600; returns its path."""
    path = state_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{state.pid}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(state.to_json())
    os.replace(tmp, path)
    return path


def remove_state(home: Path, pid: int) -> None:
    """Remove the state file if it is still this process's (a newer client may have
    replaced it)."""
    path = state_path(home)
    current = _load(path)
    if isinstance(current, ClientState) and current.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's: not a client we started
        return False
    return True


def _is_loopback_url(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def _load(path: Path) -> ClientState | str:
    """The state in ``path``, or why there is none usable."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "no running client (no state file)"
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        return "the state file is not private to this user"
    if st.st_size > MAX_STATE_BYTES:
        return "the state file is too large"
    try:
        data = json.loads(path.read_text())
        state = ClientState(url=str(data["url"]), pid=int(data["pid"]),
                            insecure=bool(data["insecure"]),
                            api_key=None if data.get("api_key") is None
                            else str(data["api_key"]))
    except (OSError, ValueError, KeyError, TypeError):
        return "the state file is unreadable"
    if not _is_loopback_url(state.url):
        return "the state file names a non-loopback URL"
    return state


def find_client(home: Path) -> ClientState | str:
    """The running client of ``home``, or a short reason why `ask` must use its own node."""
    state = _load(state_path(home))
    if isinstance(state, str):
        return state
    if not pid_alive(state.pid):
        return f"stale state file (pid {state.pid} is not running)"
    return state


class ClientUnavailable(Exception):
    """The client could not take the job; nothing was printed, so the caller may use
    its own node instead."""


class ClientJobError(Exception):
    """The client answered with an error. ``no_provider``: nobody serves the model."""

    def __init__(self, message: str, *, no_provider: bool) -> None:
        super().__init__(message)
        self.no_provider = no_provider


@dataclass(frozen=True)
class ClientAnswer:
    text: str
    provider: str
    insecure: bool
    finish_reason: str  # as the provider reported it
    prompt_tokens: int
    completion_tokens: int
    cost_nanoton: int
    ttft_s: float  # from sending the request to the first text
    elapsed_s: float


def _error_of(body: Any) -> tuple[str, str]:
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        return "", "unexpected answer from the local client"
    return str(error.get("code") or ""), str(error.get("message") or "")[:MAX_MESSAGE_CHARS]


def stream_completion(
    state: ClientState,
    model: str,
    prompt: str,
    *,
    max_tokens: int,
    params: Mapping[str, Any],
    on_text: Callable[[str], None],
    clock: Callable[[], float] = time.monotonic,
) -> ClientAnswer:
    """Run one completion through the client's ``/v1/completions``, streamed; calls
    ``on_text`` with each piece of text in order. Raises ClientUnavailable before any
    text (so the caller can fall back), ClientJobError when the client reports one."""
    parts = urlsplit(state.url)
    assert parts.hostname is not None and parts.port is not None
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "stream": True, "stream_options": {"include_usage": True},
                       **params}).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if state.api_key:
        headers["Authorization"] = f"Bearer {state.api_key}"
    start = clock()
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=CONNECT_TIMEOUT_S)
    try:
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(READ_TIMEOUT_S)
            conn.request("POST", "/v1/completions", body=body, headers=headers)
            resp = conn.getresponse()
        except OSError as exc:
            raise ClientUnavailable(f"cannot reach it: {type(exc).__name__}") from exc
        if resp.status != 200:
            try:
                payload = json.loads(resp.read(MAX_ERROR_BODY_BYTES))
            except (OSError, ValueError):
                payload = None
            code, message = _error_of(payload)
            if resp.status in (401, 403, 404, 405, 415) and code != "model_not_found":
                raise ClientUnavailable(f"it refused the request (HTTP {resp.status})")
            raise ClientJobError(message or f"HTTP {resp.status}",
                                 no_provider=code in NO_PROVIDER_CODES)
        return _read_events(resp, on_text, start, clock)
    finally:
        conn.close()


def _read_events(resp: http.client.HTTPResponse, on_text: Callable[[str], None],
                 start: float, clock: Callable[[], float]) -> ClientAnswer:
    texts: list[str] = []
    ttft: float | None = None
    final: Mapping[str, Any] = {}
    usage: Mapping[str, Any] = {}
    while True:
        try:
            line = resp.readline(MAX_EVENT_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            raise ClientJobError(f"the local client's stream broke: {type(exc).__name__}",
                                 no_provider=False) from exc
        if not line:
            raise ClientJobError("the local client's stream ended early", no_provider=False)
        if not line.startswith(b"data: "):
            continue  # blank separators (and comments, if any)
        data = line[len(b"data: "):].strip()
        if data == b"[DONE]":
            break
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise ClientJobError("unreadable event from the local client",
                                 no_provider=False) from exc
        if not isinstance(event, Mapping):
            continue
        if "error" in event:
            code, message = _error_of(event)
            raise ClientJobError(message, no_provider=code in NO_PROVIDER_CODES)
        for choice in event.get("choices") or []:
            text = choice.get("text") if isinstance(choice, Mapping) else None
            if isinstance(text, str) and text:
                if ttft is None:
                    ttft = clock() - start
                texts.append(text)
                on_text(text)
        if isinstance(event.get("meshnode"), Mapping):
            final = event["meshnode"]
        if isinstance(event.get("usage"), Mapping):
            usage = event["usage"]
    elapsed = clock() - start
    return ClientAnswer(
        text="".join(texts),
        provider=str(final.get("provider", "")),
        insecure=bool(final.get("insecure", True)),
        finish_reason=str(final.get("finish_reason", "")),
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        cost_nanoton=int(final.get("cost_nanoton", 0)),
        ttft_s=elapsed if ttft is None else ttft,
        elapsed_s=elapsed,
    )
