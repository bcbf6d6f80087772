"""The local control socket: `meshnode status` asks a running node what it is doing.

A Unix stream socket at `<home>/run/control.sock`, mode 0600 inside a 0700 folder, so
only the node's own user can connect. One request per connection: a JSON line such as
`{"get": "status"}`, answered by one JSON line, then the node closes the connection.
The socket is read-only: there is no request that changes the node.

Not verified: the peer's uid (SO_PEERCRED); the file mode is the access control.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from trio_typing import TaskStatus

from meshnode.core.errors import EXIT_USAGE, MeshnodeError

log = logging.getLogger(__name__)

RUN_DIR = "run"
SOCKET_NAME = "control.sock"
# A request is one short JSON line; anything longer is not a client of ours.
MAX_REQUEST_BYTES = 1024
# A status document lists at most a few hundred peers: a few hundred KiB at most.
MAX_REPLY_BYTES = 4 * 1024 * 1024
# A local client answers at once; one that stalls loses its connection.
REQUEST_TIMEOUT_S = 5.0
# Building the status reads sqlite and the directory: well under a second.
REPLY_TIMEOUT_S = 10.0
# `status` waits this long for the node's answer before giving up.
CLIENT_TIMEOUT_S = 10.0
# Unix socket paths are limited to 108 bytes on Linux (sun_path), terminator included.
MAX_SOCKET_PATH = 107
# Connections served at once: status is for one operator, not a crowd.
MAX_CONNECTIONS = 8

Handler = Callable[[], Awaitable[dict[str, Any]]]


class ControlError(MeshnodeError):
    """The control socket cannot be created or reached; the message says why."""

    label = "control socket"


class NodeNotRunning(ControlError):
    exit_code = 3


def socket_path(home: Path) -> Path:
    return home / RUN_DIR / SOCKET_NAME


def _check_path(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ControlError(
            f"{path} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket path may "
            "have; use a shorter --home", exit_code=EXIT_USAGE,
        )


def _remove_stale(path: Path) -> None:
    """Unlink a socket left by a node that died; refuse if a node still answers on it."""
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise ControlError(f"{path} exists and is not a socket; remove it",
                           exit_code=EXIT_USAGE)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: stale
        return
    finally:
        probe.close()
    raise ControlError(
        f"another node is running with this home ({path} answers); give each node its "
        "own --home", exit_code=EXIT_USAGE,
    )


async def _bind(home: Path) -> tuple[trio.socket.SocketType, Path]:
    """A listening socket at `socket_path(home)`, mode 0600, its folder 0700."""
    path = socket_path(home)
    _check_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    _remove_stale(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the file is born 0600: no window where others connect
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(MAX_CONNECTIONS)
    return sock, path


async def _answer(stream: trio.SocketStream, handler: Handler) -> None:
    try:
        with trio.fail_after(REQUEST_TIMEOUT_S):
            data = b""
            while b"\n" not in data:
                chunk = await stream.receive_some(MAX_REQUEST_BYTES)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_REQUEST_BYTES:
                    raise ValueError("request too long")
        request = json.loads(data.split(b"\n", 1)[0] or b"{}")
        if not isinstance(request, dict) or request.get("get") != "status":
            reply: dict[str, Any] = {"error": "unknown request: send {\"get\": \"status\"}"}
        else:
            with trio.fail_after(REPLY_TIMEOUT_S):
                reply = {"status": await handler()}
        with trio.fail_after(REQUEST_TIMEOUT_S):
            await stream.send_all(json.dumps(reply).encode() + b"\n")
    except (ValueError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        log.debug("control request dropped: %s", type(exc).__name__)
    finally:
        await stream.aclose()


async def serve_control(
    home: Path,
    handler: Handler,
    *,
    task_status: TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer status requests on the control socket until cancelled; removes it after."""
    sock, path = await _bind(home)
    listener = trio.SocketListener(sock)
    try:
        async with listener, trio.open_nursery() as nursery:
            task_status.started(path)
            while True:
                stream = await listener.accept()
                nursery.start_soon(_answer, stream, handler)
    finally:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


async def request_status(home: Path) -> dict[str, Any]:
    """The status document of the node running with `home`; NodeNotRunning if none."""
    path = socket_path(home)
    _check_path(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(CLIENT_TIMEOUT_S):
            try:
                await sock.connect(str(path))
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                    raise NodeNotRunning(
                        f"no node is running with home {home} ({path} "
                        f"{'is missing' if exc.errno == errno.ENOENT else 'is stale'}); "
                        "start one with `meshnode serve|client|bootstrap`, or pass its --home"
                    ) from None
                if exc.errno == errno.EACCES:
                    raise ControlError(
                        f"{path} belongs to another user: run status as the node's user"
                    ) from None
                raise
            stream = trio.SocketStream(sock)
            await stream.send_all(b'{"get": "status"}\n')
            data = b""
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_REPLY_BYTES:
                    raise ControlError(f"the node's answer is over {MAX_REPLY_BYTES} bytes")
    except trio.TooSlowError:
        raise ControlError(f"the node on {path} did not answer within "
                           f"{CLIENT_TIMEOUT_S:.0f} s") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise ControlError(f"the node on {path} sent something that is not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("status"), dict):
        raise ControlError(f"unexpected answer on {path}: {str(reply)[:200]}")
    status: dict[str, Any] = reply["status"]
    return status
