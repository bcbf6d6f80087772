"""Reaching providers: by multiaddr (fetching and listing the advert), or by advert
(direct addresses first, then a relay circuit)."""

from __future__ import annotations

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


class Dialer:
    def __init__(self, host: IHost, verified: VerifiedDirectory) -> None:
        self.host = host
        self.verified = verified
        self.relay: RelayClient | None = None  # set when the client joined the mesh

    async def connect(self, addr: str) -> Advert:
        """Dial a provider by multiaddr, fetch its advert, verify and list it."""
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
