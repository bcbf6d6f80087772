"""A client's job streams: a spare one kept open per recently used provider.

The trio side of ``core.spare_streams.SparePolicy``: ``JobStreams.run`` (in the client
node's nursery) opens spares after jobs end, retires them before the provider's Open
timeout and closes them all when the node stops. ``stream_for`` hands a job the peer's
spare when it is still fresh (``p2p.stream_open.stream_is_fresh``), else a new stream.
A spare that turns out dead once used is the job driver's to replace
(``jobs.client.run_job`` resends its first frames on a fresh stream).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import trio
from libp2p.abc import IHost, INetStream
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from trio_typing import TaskStatus

from meshnode.core.messages import JOB_PROTOCOL
from meshnode.core.spare_streams import SparePolicy
from meshnode.p2p.stream_open import open_stream, stream_is_fresh

log = logging.getLogger(__name__)

# Opening a stream to a connected peer is one round trip; 10 s means the peer is gone.
STREAM_OPEN_TIMEOUT_S = 10.0
# Closing a spare is one yamux frame; past this the connection is stuck (bounded anyway).
SPARE_CLOSE_TIMEOUT_S = 1.0


class JobStreams:
    def __init__(self, host: IHost, policy: SparePolicy[INetStream] | None = None) -> None:
        self.host = host
        self.policy: SparePolicy[INetStream] = policy or SparePolicy()
        self.opened = 0  # streams opened for jobs when no spare could be used
        self.spares_opened = 0
        self.spares_used = 0
        # Whether a spare can carry a job (tests replace it to hand out a dead one).
        self.is_fresh: Callable[[INetStream], bool] = stream_is_fresh
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()

    async def stream_for(self, peer: ID) -> tuple[INetStream, bool]:
        """A job stream to `peer`, and whether it is a spare (opened before this job)."""
        spare, stale = self.policy.take(peer.to_base58(), trio.current_time())
        self._close_later(stale)
        if spare is not None:
            if self.is_fresh(spare):
                self.spares_used += 1
                return spare, True
            self._close_later([spare])
        return await self.fresh(peer), False

    async def fresh(self, peer: ID) -> INetStream:
        """A new job stream to `peer` (no spare)."""
        self.opened += 1
        return await open_stream(self.host, peer, JOB_PROTOCOL, STREAM_OPEN_TIMEOUT_S)

    def job_ended(self, peer: ID) -> None:
        """A job to `peer` ended well: keep a spare stream to it for the next one."""
        self._close_later(self.policy.job_ended(peer.to_base58(), trio.current_time()))
        self._wake.set()

    def forget(self, peer: ID) -> None:
        """A job to `peer` failed: no spare for it until it serves a job again."""
        self._close_later(self.policy.forget(peer.to_base58()))

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open, retire and replace spares until cancelled; then close every spare."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    now = trio.current_time()
                    for stream in self.policy.expired(now):
                        nursery.start_soon(_close, stream)
                    for peer in self.policy.wanted(now):
                        nursery.start_soon(self._open_spare, peer)
                    deadline = self.policy.next_deadline()
                    with trio.move_on_at(math.inf if deadline is None else deadline):
                        await self._wake.wait()
                    self._wake = trio.Event()
        finally:
            self._nursery = None
            with trio.CancelScope(shield=True):
                for stream in self.policy.drain():
                    await _close(stream)

    async def _open_spare(self, peer: str) -> None:
        try:
            stream = await open_stream(self.host, ID.from_base58(peer), JOB_PROTOCOL,
                                       STREAM_OPEN_TIMEOUT_S)
        except (OSError, trio.TooSlowError, BaseLibp2pError) as exc:
            # no connection, a refusal, a timeout: only means no spare
            log.debug("no spare job stream to %s: %s", peer[:16], type(exc).__name__)
            self.policy.failed(peer)
            return
        self.spares_opened += 1
        now = trio.current_time()
        for unwanted in self.policy.opened(peer, stream, now):
            await _close(unwanted)
        self._wake.set()  # the next expiry is now this spare's

    def _close_later(self, streams: list[INetStream]) -> None:
        for stream in streams:
            if self._nursery is not None:
                self._nursery.start_soon(_close, stream)


async def _close(stream: INetStream) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(SPARE_CLOSE_TIMEOUT_S):
        try:
            await stream.reset()
        except Exception:  # already gone: nothing to free
            pass
