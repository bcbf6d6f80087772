"""Serve the OpenAI-compatible app with hypercorn on trio, on loopback by default.

The endpoint spends the client's money and reads its prompts in plaintext, so by
default it binds to loopback only. Binding elsewhere needs ``allow_remote=True`` *and*
an API key: an open endpoint on a LAN would be a free, paid-for LLM for anyone.
"""

from __future__ import annotations

import ipaddress
import logging
import resource
import socket

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

# trio-typing (pulled in by libp2p) shadows trio's own annotations and lacks TaskStatus.
from trio_typing import TaskStatus

from meshnode.api.app import create_app
from meshnode.api.backend import CompletionBackend
from meshnode.core.errors import EXIT_USAGE, MeshnodeError

log = logging.getLogger(__name__)

DEFAULT_API_HOST = "127.0.0.1"
DEFAULT_API_PORT = 8080  # llama.cpp's server and most local OpenAI-compatible tools use it
# In-flight streams get this long to finish on a graceful shutdown before being cut.
GRACEFUL_SHUTDOWN_S = 5.0
# Idle keep-alive connections from SDK connection pools are closed after this long.
KEEP_ALIVE_TIMEOUT_S = 30.0
# Connections the kernel queues before we accept them. hypercorn's default of 100 reset
# 177 of 1,000 concurrent connects; a burst that size must wait in the queue, not be
# refused (the kernel caps it at net.core.somaxconn, 4096 on current Linux).
LISTEN_BACKLOG = 2048
# Open files the API process asks for: room for a burst of 1,000 HTTP connections next to
# its libp2p connections and files. Most systems start processes with a soft limit of
# 1,024 (and a far higher hard limit), where such a burst runs out of descriptors and
# hypercorn stops accepting.
WANTED_OPEN_FILES = 8192


class BindRefused(MeshnodeError, ValueError):
    """The requested listen address is not allowed with the given settings."""

    exit_code = EXIT_USAGE
    label = "refused"


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in infos
    )


def check_bind(host: str, *, allow_remote: bool, api_key: str | None) -> None:
    """Raise ``BindRefused`` unless binding ``host`` is safe under these settings."""
    if is_loopback(host):
        return
    if not allow_remote:
        raise BindRefused(
            f"refusing to serve the API on {host!r}, which is not a loopback address: "
            "anyone who can reach it could spend your funds. Bind 127.0.0.1, or allow "
            "remote access explicitly and set an API key."
        )
    if not api_key:
        raise BindRefused(f"serving the API on non-loopback {host!r} requires an API key")


def raise_open_files_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never above the hard limit, never
    lowering it); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # a container may forbid it; keep going
            log.warning("could not raise the open-files limit to %d: %s", target, exc)
    return soft


def _bind_string(host: str, port: int) -> str:
    bare = host.strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as given to ``--api``; ValueError if bad."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in [0, 65535], got {port}")
    return host.strip("[]"), port


async def serve_api(
    backend: CompletionBackend,
    host: str = DEFAULT_API_HOST,
    port: int = DEFAULT_API_PORT,
    *,
    api_key: str | None = None,
    allow_remote: bool = False,
    shutdown: trio.Event | None = None,
    task_status: TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled (or ``shutdown`` is set: graceful). Use with
    ``url = await nursery.start(serve_api, backend, host, port)``; ``url`` is the base
    URL actually bound (port 0 picks a free port), e.g. ``http://127.0.0.1:8080``."""
    check_bind(host, allow_remote=allow_remote, api_key=api_key)
    raise_open_files_limit()
    config = Config()
    config.bind = [_bind_string(host, port)]
    config.graceful_timeout = GRACEFUL_SHUTDOWN_S
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    config.backlog = LISTEN_BACKLOG
    config.include_server_header = False
    config.accesslog = None
    # Through our logging setup (levels, handlers) rather than hypercorn's own stderr writer.
    config.errorlog = logging.getLogger("meshnode.api.http")
    # A loopback bind answers only to loopback names and its own; a remote one (with its
    # required key) to any Host, since the machine's names cannot be listed.
    app = create_app(backend, api_key=api_key,
                     allowed_hosts=[host] if is_loopback(host) else None)

    async def started(*, task_status: TaskStatus[list[str]]) -> None:
        await serve(
            # hypercorn's ASGI types are TypedDicts, Starlette's are plain mappings.
            app,  # type: ignore[arg-type]
            config,
            shutdown_trigger=shutdown.wait if shutdown is not None else None,
            task_status=task_status,
        )

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(started)
        url = binds[0]
        log.info("OpenAI-compatible API on %s/v1", url)
        task_status.started(url)
