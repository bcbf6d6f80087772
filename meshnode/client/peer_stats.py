"""What the client measured about providers, kept across restarts in a JSON file.

The file has one writer. Every finished job asks for a save, and a busy API finishes
hundreds at once: they used to write the same ``peer-stats.tmp`` from as many threads,
so one thread's rename found the temp file already gone and its job failed with a 500.
Now a save only marks the statistics dirty; whoever holds the lock writes the latest
snapshot, and the callers queued behind it find nothing left to write. Each write goes
to a temp file of its own (another process on the same home may be saving too) and is
renamed over the file atomically, so a reader sees the old or the new file, never half.

Not verified: that two processes' snapshots merge; the last rename wins.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import trio

from meshnode.core.router import Router, StatsFormatError

log = logging.getLogger(__name__)


class PeerStatsFile:
    def __init__(self, router: Router, path: Path | None) -> None:
        self.router = router
        self.path = path
        self._dirty = False
        self._writer = trio.Lock()  # the one writer; queued savers coalesce behind it
        self.writes = 0  # files written, for tests and metrics

    def load(self) -> None:
        """Read the file into the router; an unreadable one is ignored (with a warning)."""
        if self.path is None or not self.path.exists():
            return
        try:
            self.router.import_stats(json.loads(self.path.read_text()))
        except (ValueError, StatsFormatError) as exc:
            log.warning("ignoring unreadable peer statistics %s: %s", self.path, exc)

    async def save(self) -> None:
        """Persist the router's statistics as they are now (or later: never older).

        Returns once a snapshot taken after this call began is on disk. Concurrent calls
        share one write; a failed write is logged, never raised into the finished job."""
        if self.path is None:
            return
        self._dirty = True
        async with self._writer:
            if not self._dirty:  # a write that began after our call already covered us
                return
            self._dirty = False
            data = json.dumps(self.router.export_stats())
            try:
                await trio.to_thread.run_sync(_write_atomically, self.path, data)
            except OSError as exc:
                self._dirty = True  # try again with the next save
                log.warning("could not save peer statistics to %s: %s", self.path, exc)
                return
            self.writes += 1


def _write_atomically(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
