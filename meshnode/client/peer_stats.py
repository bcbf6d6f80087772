"""What the client measured about providers, kept across restarts in a JSON file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import trio

from meshnode.core.router import Router, StatsFormatError

log = logging.getLogger(__name__)


class PeerStatsFile:
    def __init__(self, router: Router, path: Path | None) -> None:
        self.router = router
        self.path = path

    def load(self) -> None:
        """Read the file into the router; an unreadable one is ignored (with a warning)."""
        if self.path is None or not self.path.exists():
            return
        try:
            self.router.import_stats(json.loads(self.path.read_text()))
        except (ValueError, StatsFormatError) as exc:
            log.warning("ignoring unreadable peer statistics %s: %s", self.path, exc)

    async def save(self) -> None:
        if self.path is None:
            return
        data = json.dumps(self.router.export_stats())
        path = self.path

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(data)
            tmp.replace(path)

        await trio.to_thread.run_sync(write)
