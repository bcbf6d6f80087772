"""libp2p host factory: TCP + Noise only + yamux (window enforced), limits on, no dial delay.

py-libp2p offers plaintext, secio and TLS next to Noise by default; a host built here
negotiates Noise or nothing. Its swarm waits 250 ms ("happy eyeballs") after starting each
dial, even with one address; meshnode dials known providers directly, so that is pure
latency per job. We set the delay to zero and check that the code we patch still reads
the constant, so an upgrade of py-libp2p that moves it fails loudly instead of silently
bringing the delay back.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import libp2p.network.swarm as swarm_module
import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID

from meshnode import library_logs
from meshnode.identity import NodeIdentity
from meshnode.p2p import limits, yamux_guard

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
# Connecting to a provider on a LAN or the internet takes < 1 s; 10 s covers slow paths
# through relays without letting a dead address hold a job for long.
DIAL_TIMEOUT_S = 10.0
_DIAL_DELAY_NAME = "_HAPPY_EYEBALLS_DELAY"


class Libp2pCompatError(RuntimeError):
    """The installed py-libp2p no longer matches what this module patches."""


def remove_dial_delay() -> None:
    current = getattr(swarm_module, _DIAL_DELAY_NAME, None)
    if not isinstance(current, (int, float)):
        raise Libp2pCompatError(
            f"libp2p.network.swarm.{_DIAL_DELAY_NAME} is gone (py-libp2p changed); "
            "update meshnode.p2p.host.remove_dial_delay for this version"
        )
    source = inspect.getsource(swarm_module.Swarm.dial_peer)
    if _DIAL_DELAY_NAME not in source:
        raise Libp2pCompatError(
            f"Swarm.dial_peer no longer reads {_DIAL_DELAY_NAME}; the per-dial delay may be "
            "back under another name: update meshnode.p2p.host.remove_dial_delay"
        )
    setattr(swarm_module, _DIAL_DELAY_NAME, 0.0)


def dial_delay() -> float:
    return float(getattr(swarm_module, _DIAL_DELAY_NAME))


def make_host(identity: NodeIdentity) -> IHost:
    library_logs.reapply()  # libp2p's import reset its logger; put the CLI's level back
    remove_dial_delay()
    yamux_guard.install()
    key_pair = create_new_key_pair(identity.peer_seed)
    # The Noise static key is separate from the peer key and may be ephemeral: the
    # handshake signs it with the peer key, which is what authenticates the peer.
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): yamux_guard.WindowedYamux},
        connection_config=connection_config(),
    )
    limits.install(host)
    return host


def connection_config() -> ConnectionConfig:
    # py-libp2p's auto-connector keeps >= 50 connections by dialing every peer in the
    # peerstore, including clients long gone; meshnode decides whom to dial (bootstrap,
    # DHT, chosen providers), so the floor is zero. With low=0 and high=300 it still aimed
    # for 150 and redialed departed clients for ever: ``limits.install`` switches it off.
    # The pruner trims back to 0 only above ``high_watermark``, i.e. above our own cap.
    return ConnectionConfig(
        min_connections=0,
        low_watermark=0,
        high_watermark=limits.MAX_CONNECTIONS,
        max_connections=limits.MAX_CONNECTIONS,
        max_connections_per_peer=limits.MAX_CONNECTIONS_PER_PEER,
        inbound_upgrade_timeout=limits.HANDSHAKE_TIMEOUT_S,
    )


@asynccontextmanager
async def running_host(
    identity: NodeIdentity, listen: str | None = DEFAULT_LISTEN
) -> AsyncIterator[IHost]:
    """A started host; `listen=None` listens nowhere (reachable only through a relay)."""
    host = make_host(identity)
    async with host.run(listen_addrs=[multiaddr.Multiaddr(listen)] if listen else []):
        try:
            yield host
        finally:
            await host.close()


def full_addrs(host: IHost) -> list[str]:
    """Dialable multiaddrs including /p2p/<peer id>."""
    pid = host.get_id().to_string()
    out = []
    for addr in host.get_addrs():
        text = str(addr)
        out.append(text if "/p2p/" in text else f"{text}/p2p/{pid}")
    return out


def parse_peer_addr(addr: str) -> PeerInfo:
    try:
        return info_from_p2p_addr(multiaddr.Multiaddr(addr))
    except Exception as exc:
        raise ValueError(
            f"not a dialable peer address: {addr!r} (expected /ip4/HOST/tcp/PORT/p2p/PEER_ID)"
        ) from exc


def peer_id_text(peer: ID) -> str:
    return peer.to_string()


def forget_closed_connections(host: IHost, peer: ID) -> int:
    """Drop connections to ``peer`` that are dead but still listed; how many were.

    py-libp2p 0.8 can keep a dead connection in the swarm's table after the peer went
    down (seen when a provider is killed and restarts under the same peer id), and a
    cut connection is marked closed before its close finishes removing it. Then
    ``connect`` sees "connected" and dials nothing, and ``new_stream`` filters the dead
    connection out and fails with "No valid connections". Call this before either.
    Dead means the connection is closed, or its muxer (yamux) is."""
    network = host.get_network()
    dropped = 0
    for conn in list(network.connections.get(peer) or []):
        muxed = getattr(conn, "muxed_conn", None)
        if getattr(conn, "is_closed", False) or getattr(muxed, "is_closed", False):
            network.remove_conn(conn)  # type: ignore[attr-defined]
            dropped += 1
    return dropped
