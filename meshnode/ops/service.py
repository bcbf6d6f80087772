"""Start a node's operator endpoints in its nursery: one call per role command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trio

from meshnode.ops.control import serve_control
from meshnode.ops.http import serve_ops
from meshnode.ops.views import NodeView


@dataclass(frozen=True)
class OpsEndpoints:
    control_socket: Path
    url: str | None  # base URL of /metrics and the status page, when enabled


async def start_ops(
    nursery: trio.Nursery,
    view: NodeView,
    *,
    home: Path,
    metrics: tuple[str, int] | None,
) -> OpsEndpoints:
    """The control socket always (`meshnode status`), HTTP when `metrics` is given.
    Both live as long as `nursery`."""
    path: Path = await nursery.start(serve_control, home, view.status)
    url: str | None = None
    if metrics is not None:
        url = await nursery.start(serve_ops, view, metrics[0], metrics[1])
    return OpsEndpoints(path, url)
