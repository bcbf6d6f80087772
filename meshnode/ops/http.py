"""The operator's HTTP endpoint: Prometheus metrics, a status page and its JSON.

    GET /metrics      Prometheus text format 0.0.4 (`core.metrics_text`)
    GET /             the status page (page.html: polls /status.json)
    GET /status.json  the node's status document (the same as `meshnode status --json`)

It binds loopback unless the operator allows otherwise: the status names peers, jobs
and earnings. It serves only reads; there is no request that changes the node.
"""

from __future__ import annotations

import logging
from importlib import resources

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from trio_typing import TaskStatus

from meshnode.api.server import is_loopback
from meshnode.core.errors import EXIT_USAGE, MeshnodeError
from meshnode.core.metrics_text import CONTENT_TYPE, render
from meshnode.ops.views import NodeView

# Prometheus scrapes keep their connection open between scrapes (default interval 15 s).
KEEP_ALIVE_TIMEOUT_S = 30.0
# On shutdown a scrape in flight gets this long to finish.
GRACEFUL_SHUTDOWN_S = 2.0
DEFAULT_METRICS_PORT = 9464  # the port OpenTelemetry's Prometheus exporter made usual

PAGE = "page.html"


class MetricsBindRefused(MeshnodeError):
    exit_code = EXIT_USAGE
    label = "refused"


def parse_bind(value: str, *, allow_remote: bool) -> tuple[str, int]:
    """`HOST:PORT` for --metrics; loopback only unless `allow_remote`."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise MetricsBindRefused(f"--metrics wants HOST:PORT such as 127.0.0.1:"
                                 f"{DEFAULT_METRICS_PORT}, not {value!r}")
    host = host.strip("[]")
    if not allow_remote and not is_loopback(host):
        raise MetricsBindRefused(
            f"refusing to serve metrics and status on {host!r}, which is not a loopback "
            "address: they show peers, jobs and earnings. Bind 127.0.0.1, or pass "
            "--allow-remote-metrics."
        )
    return host, int(port_text)


def page_html() -> str:
    return resources.files("meshnode.ops").joinpath(PAGE).read_text(encoding="utf-8")


def create_ops_app(view: NodeView) -> Starlette:
    page = page_html()

    async def metrics(_request: Request) -> Response:
        families = await view.metrics()
        return Response(render(families, {"role": view.role}), media_type=CONTENT_TYPE)

    async def status_json(_request: Request) -> Response:
        return JSONResponse(await view.status(), headers={"Cache-Control": "no-store"})

    async def status_page(_request: Request) -> Response:
        return HTMLResponse(page, headers={
            "Cache-Control": "no-store",
            # The page runs only its own inline script and fetches only this origin.
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
            "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:",
        })

    return Starlette(routes=[
        Route("/metrics", metrics),
        Route("/status.json", status_json),
        Route("/", status_page),
    ])


async def serve_ops(
    view: NodeView,
    host: str,
    port: int,
    *,
    task_status: TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `await nursery.start(...)` returns the bound base URL."""
    config = Config()
    bare = host.strip("[]")
    config.bind = [f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"]
    config.graceful_timeout = GRACEFUL_SHUTDOWN_S
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT_S
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.ops")  # "Running on …" is print_ops's job
    app = create_ops_app(view)

    async def started(*, task_status: TaskStatus[list[str]]) -> None:
        await serve(app, config, task_status=task_status)  # type: ignore[arg-type]

    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(started)
        task_status.started(binds[0])
