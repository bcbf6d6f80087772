"""Which pre-opened job stream a client may use, keep or replace (HTTP keep-alive's idea).

Opening a job stream is a yamux SYN plus multistream-select: one round trip, and on
py-libp2p 4-8 ms of a small CPU, the largest part of a job's time to first token through
the mesh. After a job to a provider ends, the client opens the next job stream to it in
the background (a *spare*), so its next job there starts by sending Open.

A provider waits at most ``OPEN_TIMEOUT_S`` for the Open on a new stream, then closes it.
So a spare is used or replaced before it is half that old, only for providers used
within ``SPARE_KEEP_S``, for at most ``MAX_SPARE_PEERS`` of them. This module is only
the bookkeeping (sans-io: streams are opaque, time is a parameter); ``jobs.job_streams``
opens and closes the streams. What it does not know: whether a stream is still alive.
The driver checks that before using a spare, and falls back to a fresh stream.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from meshnode.core.job_protocol import OPEN_TIMEOUT_S

S = TypeVar("S")

# A spare is used or replaced when half of the provider's wait for Open is gone: the
# other half covers the Open's trip and a stalled event loop on either side.
SPARE_MAX_AGE_S = OPEN_TIMEOUT_S / 2
# A provider keeps a spare for a minute after its last job: a chat's next turn, a batch
# script's next request. Past that a spare costs the provider a waiting handler for nothing.
SPARE_KEEP_S = 60.0
# Providers a client keeps spares for: a routed client spreads jobs over a few; each
# spare is one stream and one waiting handler task at its provider.
MAX_SPARE_PEERS = 8


class SparePolicy(Generic[S]):
    """Spares by peer id. Every call that drops a spare returns it, for the caller to
    close; nothing here does I/O or reads a clock."""

    def __init__(self, *, max_age_s: float = SPARE_MAX_AGE_S, keep_s: float = SPARE_KEEP_S,
                 max_peers: int = MAX_SPARE_PEERS) -> None:
        self.max_age_s = max_age_s
        self.keep_s = keep_s
        self.max_peers = max_peers
        self._spares: dict[str, tuple[S, float]] = {}  # peer -> (stream, opened at)
        self._recent: OrderedDict[str, float] = OrderedDict()  # peer -> last job end, LRU
        self._opening: set[str] = set()

    def take(self, peer: str, now: float) -> tuple[S | None, list[S]]:
        """The peer's spare if it is young enough (it leaves the pool), and what to close."""
        held = self._spares.pop(peer, None)
        if held is None:
            return None, []
        stream, opened_at = held
        if now - opened_at >= self.max_age_s:
            return None, [stream]
        return stream, []

    def job_ended(self, peer: str, now: float) -> list[S]:
        """A job to `peer` ended: keep a spare for it (the least recently used peer past
        the bound loses its own)."""
        self._recent[peer] = now
        self._recent.move_to_end(peer)
        dropped: list[S] = []
        while len(self._recent) > self.max_peers:
            old, _ = self._recent.popitem(last=False)
            dropped += self._drop(old)
        return dropped

    def wanted(self, now: float) -> list[str]:
        """Peers to open a spare for now (each is then opening until `opened`/`failed`)."""
        peers = [p for p, used in self._recent.items()
                 if now - used < self.keep_s and p not in self._spares
                 and p not in self._opening]
        self._opening.update(peers)
        return peers

    def opened(self, peer: str, stream: S, now: float) -> list[S]:
        """A spare for `peer` is open; returns it back if it is no longer wanted."""
        self._opening.discard(peer)
        if peer not in self._recent or peer in self._spares:
            return [stream]
        self._spares[peer] = (stream, now)
        return []

    def failed(self, peer: str) -> None:
        """Opening a spare failed: the peer's next job opens its own stream."""
        self._opening.discard(peer)
        self._recent.pop(peer, None)  # no retry loop against a peer that is gone

    def expired(self, now: float) -> list[S]:
        """Spares too old to use (they leave the pool) and peers no longer recent."""
        for peer in [p for p, used in self._recent.items() if now - used >= self.keep_s]:
            del self._recent[peer]
        old = [p for p, (_, at) in self._spares.items()
               if now - at >= self.max_age_s or p not in self._recent]
        return [stream for p in old for stream in self._drop(p)]

    def next_deadline(self) -> float | None:
        """When `expired` next has something to do (None: nothing held or wanted)."""
        times = [at + self.max_age_s for _, at in self._spares.values()]
        times += [used + self.keep_s for used in self._recent.values()]
        return min(times) if times else None

    def forget(self, peer: str) -> list[S]:
        """The peer is gone (disconnected, failed): drop it and its spare."""
        self._recent.pop(peer, None)
        return self._drop(peer)

    def drain(self) -> list[S]:
        """Everything held, for closing (the client is stopping)."""
        streams = [s for s, _ in self._spares.values()]
        self._spares.clear()
        self._recent.clear()
        return streams

    @property
    def held(self) -> int:
        return len(self._spares)

    def _drop(self, peer: str) -> list[S]:
        held = self._spares.pop(peer, None)
        return [] if held is None else [held[0]]
