"""The peer-statistics file has one writer, however many jobs finish at once."""

from __future__ import annotations

import json
from pathlib import Path

import trio

from meshnode.client.peer_stats import PeerStatsFile
from meshnode.core.router import Router

# As many saves as jobs finishing together under the API load test: enough that the old
# shared temp file raced on every run.
CONCURRENT_SAVES = 300


async def test_hundreds_of_concurrent_saves_all_succeed_and_leave_the_latest_snapshot(
    tmp_path: Path,
) -> None:
    router = Router()
    path = tmp_path / "client" / "peer-stats.json"
    stats = PeerStatsFile(router, path)

    async def job_finishes(i: int) -> None:
        router.record_rtt(f"peer-{i % 7}", 0.01 * (i % 5 + 1), now=1000.0 + i)
        await stats.save()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(CONCURRENT_SAVES):
                nursery.start_soon(job_finishes, i)
    assert json.loads(path.read_text()) == router.export_stats()
    assert stats.writes < CONCURRENT_SAVES / 10  # coalesced, not one write per job
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left


async def test_a_saved_file_loads_back_into_a_fresh_router(tmp_path: Path) -> None:
    router = Router()
    router.record_rtt("peer-a", 0.02, now=5.0)
    path = tmp_path / "peer-stats.json"
    await PeerStatsFile(router, path).save()
    again = Router()
    PeerStatsFile(again, path).load()
    assert again.export_stats() == router.export_stats()
