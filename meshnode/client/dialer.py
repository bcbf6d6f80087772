"""Reaching providers: by multiaddr (fetching and listing the advert), or by advert
(direct addresses first, then a relay circuit).

A provider reached by multiaddr (``--peer``) is *pinned*: with no bootstrap, nothing else
brings its next advert, so ``keep_pinned_fresh`` fetches it again before the listed one
expires."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from meshnode.client.verified import VerifiedDirectory
from meshnode.core.advert import Advert
from meshnode.p2p.advert_exchange import fetch_signed_advert
from meshnode.p2p.host import DIAL_TIMEOUT_S, forget_closed_connections, parse_peer_addr
from meshnode.p2p.relay import RelayClient, is_circuit_addr

log = logging.getLogger(__name__)

# A pinned provider's advert is fetched again once this fraction of its lifetime has
# passed: half leaves a whole second try (after PINNED_RETRY_S) before it expires.
PINNED_REFRESH_AT = 0.5
# After a failed refresh (provider down, advert rate-limited), try again this soon.
PINNED_RETRY_S = 5.0
# Never wake more often than this, whatever lifetime a provider advertises.
PINNED_MIN_DELAY_S = 1.0


def refresh_due(issued_at: float, expires_at: float) -> float:
    """When a listed advert with this lifetime should be fetched again."""
    return issued_at + (expires_at - issued_at) * PINNED_REFRESH_AT


class Dialer:
    def __init__(self, host: IHost, verified: VerifiedDirectory) -> None:
        self.host = host
        self.verified = verified
        self.relay: RelayClient | None = None  # set when the client joined the mesh
        self.pinned: dict[str, str] = {}  # peer id -> the multiaddr it was reached at
        self.refreshes = 0
        self._pins_changed = trio.Event()

    async def connect(self, addr: str) -> Advert:
        """Dial a provider by multiaddr, fetch its advert, verify and list it; the
        provider stays pinned (``keep_pinned_fresh`` re-fetches its advert)."""
        advert = await self._fetch(addr)
        if self.pinned.get(advert.peer_id) != addr:
            self.pinned[advert.peer_id] = addr
            self._pins_changed.set()
        return advert

    async def keep_pinned_fresh(self, clock: Callable[[], float] = time.time) -> None:
        """Fetch each pinned provider's advert again before the listed one expires.
        Never returns; run it in the client's nursery."""
        retry_at: dict[str, float] = {}
        while True:
            self._pins_changed = trio.Event()
            wake = math.inf
            for peer_id, addr in list(self.pinned.items()):
                now = clock()
                listing = self.verified.directory.get(peer_id, now)
                due = retry_at.get(peer_id, -math.inf)
                if listing is not None:
                    due = max(due, refresh_due(listing.advert.issued_at,
                                               listing.advert.expires_at))
                if due <= now:
                    try:
                        await self._fetch(addr)
                        self.refreshes += 1
                        retry_at.pop(peer_id, None)
                        continue_at = clock()
                        listing = self.verified.directory.get(peer_id, continue_at)
                        due = (continue_at + PINNED_RETRY_S if listing is None else
                               refresh_due(listing.advert.issued_at, listing.advert.expires_at))
                    except Exception as exc:  # any failure of the peer: retry, never stop
                        log.warning("pinned provider %s: advert refresh failed (%s); "
                                    "retrying in %.0f s", peer_id, type(exc).__name__,
                                    PINNED_RETRY_S)
                        due = retry_at[peer_id] = clock() + PINNED_RETRY_S
                wake = min(wake, due)
            delay = max(PINNED_MIN_DELAY_S, wake - clock())
            with trio.move_on_after(delay):
                await self._pins_changed.wait()

    async def _fetch(self, addr: str) -> Advert:
        info = parse_peer_addr(addr)
        forget_closed_connections(self.host, info.peer_id)
        with trio.fail_after(DIAL_TIMEOUT_S):
            await self.host.connect(info)
        result = await self.verified.add(await fetch_signed_advert(self.host, info.peer_id))
        if result.listing is None:
            raise ConnectionError(f"advert of {info.peer_id} rejected: {result.message}")
        return result.listing.advert

    async def ensure_connected(self, advert: Advert) -> None:
        peer = ID.from_base58(advert.peer_id)
        forget_closed_connections(self.host, peer)
        if self.host.get_network().connections.get(peer):
            return
        direct = [a for a in advert.addrs if not is_circuit_addr(a)]
        relayed = [a for a in advert.addrs if is_circuit_addr(a)]
        if direct:
            try:
                addrs = [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in direct]
                with trio.fail_after(DIAL_TIMEOUT_S):
                    await self.host.connect(PeerInfo(peer, addrs))
                return
            except Exception:
                if not relayed or self.relay is None:
                    raise
        if relayed and self.relay is not None:
            with trio.fail_after(DIAL_TIMEOUT_S):
                await self.relay.dial(relayed[0])
            return
        raise ConnectionError(f"provider {advert.peer_id} advertises no address we can dial")
