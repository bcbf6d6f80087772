"""What a stranger can make a py-libp2p host hold: connections, handshakes, identify state.

py-libp2p 0.8.1 left these open (each measured against a live node, issue 13):

- **Handshake slots.** Inbound sockets take a slot of one global limiter (300) *before*
  the Noise handshake and keep it (and a task) for as long as the swarm runs, even after
  the connection closed, so a node took at most 300 inbound connections in its life;
  there is no per-IP limit. 400 raw TCP sockets that never handshake
  locked every legitimate peer out. Here, un-upgraded sockets have their own budget
  (``MAX_PENDING_HANDSHAKES_PER_IP``: one address past it is refused at accept, before
  any handshake work; ``MAX_PENDING_HANDSHAKES`` in all: when full, the *oldest* pending
  handshake is dropped, so a newcomer from another address always gets room); a
  handshake gets ``HANDSHAKE_TIMEOUT_S``. A legitimate peer behind the same address as
  an attacker can still be refused while the attacker holds that address's budget.
  Authenticated connections are capped per IP (``MAX_CONNECTIONS_PER_IP``), per peer
  (``MAX_CONNECTIONS_PER_PEER``) and in all (``MAX_CONNECTIONS``), and their slot is
  freed when the connection closes. At a cap, the oldest inbound connection that has
  stayed idle (no open stream, ``IDLE_GRACE_S``) is closed to make room; a peer that
  holds a stream open on each connection still keeps its connections. Per-IP limits
  skip ``EXEMPT_IPS`` (the node's own machine, where local testnets run).
- **Redials.** The auto-connector dials every peer in the peerstore, including clients
  that connected once and left, about once a minute, for ever. meshnode decides whom
  to dial (bootstrap, DHT, chosen providers), so the auto-connector is switched off.
- **Identify.** Identify and identify-push messages of up to 1 MiB were accepted and
  their contents kept after the peer left. Here both are capped at
  ``MAX_IDENTIFY_BYTES``; when a peer that dialed us disconnects, its protocols,
  metadata and signed record are dropped and its addresses trimmed to
  ``MAX_ADDRS_KEPT_AFTER_DISCONNECT`` (DHT answers may still name it).

Not covered: connections that arrive through a relay have no IP of their own (the
relay's limits apply to them, see ``relay.py``), and QUIC is not enabled.

The py-libp2p internals relied on are checked by ``check_compatible``; ``install`` is
called once per host by ``meshnode.p2p.host.make_host``.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee
from libp2p.host import basic_host
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.identity.identify_push.identify_push import ID_PUSH
from libp2p.identity.update import update_peerstore_from_identify
from libp2p.io.trio import TrioTCPStream
from libp2p.metrics.swarm import SwarmEvent
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.connection.swarm_connection import SwarmConn
from libp2p.network.exceptions import SwarmException
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.rcmgr import Direction
from libp2p.utils.varint import read_length_prefixed_protobuf
from multiaddr import Multiaddr

from meshnode.p2p.yamux_guard import PINNED_LIBP2P_VERSION

log = logging.getLogger(__name__)

# Addresses the per-IP limits below do not apply to: the node's own machine. Local
# testnets and benches run every node on 127.0.0.1, and a stranger who can connect from
# there already has the machine. The global limits still apply to them.
EXEMPT_IPS = frozenset({"127.0.0.1", "::1"})
# All authenticated connections: a provider serves a handful of concurrent jobs plus DHT
# and gossip neighbours; a bootstrap node hundreds of light clients. 512 file
# descriptors and ~8 MiB of yamux buffers each (worst case) stay within a small VM.
MAX_CONNECTIONS = 512
# Authenticated connections from one IP address: a NAT'd office or a host running a few
# nodes; more from one address is one machine holding slots with throwaway peer ids.
MAX_CONNECTIONS_PER_IP = 16
# Connections to one peer id: two peers dialing each other at once make two; py-libp2p's
# default of 3 leaves one spare for a reconnect racing the close of the old one.
MAX_CONNECTIONS_PER_PEER = 3
# A connection with no open stream for this long after it was set up may be closed to
# make room when a cap above is reached (as go-libp2p's connection manager trims idle
# connections): a real peer opens its first stream (identify, a job) within a second.
IDLE_GRACE_S = 5.0
# Sockets still in the TCP → multistream → Noise → yamux handshake, in all: a burst of
# real peers finishes in milliseconds, so 64 in flight is a flood, not a crowd.
MAX_PENDING_HANDSHAKES = 64
# Pending handshakes from one IP: a restart of a few nodes behind one NAT reconnects at
# once; a 9th socket from that IP while 8 are still handshaking is refused at accept.
MAX_PENDING_HANDSHAKES_PER_IP = 8
# From accept to an upgraded connection: about four round trips (multistream, Noise XX,
# multistream, yamux), under 1.5 s at an intercontinental 300 ms RTT on a loaded 2-core
# box; 5 s is 3x that. py-libp2p's default is 10 s, during which an idle socket holds a slot.
HANDSHAKE_TIMEOUT_S = 5.0
# Identify and identify-push messages: ours are ~1 KiB (a key, a few addresses and ~20
# protocol ids); go-libp2p caps them at 8 KiB per field. 64 KiB leaves room for growth.
MAX_IDENTIFY_BYTES = 64 * 1024
# Addresses kept for a peer that dialed us and left: enough for DHT answers to name a
# peer by its real addresses, not the 1,000 an identify message may carry.
MAX_ADDRS_KEPT_AFTER_DISCONNECT = 8


class Libp2pLimitsCompatError(RuntimeError):
    """The installed py-libp2p no longer matches what this module patches."""


def check_compatible() -> None:
    """Fail loudly if the py-libp2p internals wrapped here changed (see module docstring)."""
    from importlib.metadata import version

    installed = version("libp2p")
    if installed != PINNED_LIBP2P_VERSION:
        raise Libp2pLimitsCompatError(
            f"meshnode.p2p.limits was written for py-libp2p {PINNED_LIBP2P_VERSION}, found "
            f"{installed}: re-check connection admission, auto-connect and identify, then "
            "update this module"
        )
    if "self.stream = stream" not in inspect.getsource(TrioTCPStream.__init__):
        raise Libp2pLimitsCompatError(
            "TrioTCPStream no longer keeps its trio SocketStream as .stream: "
            "update meshnode.p2p.limits._Inbound.drop"
        )
    if "self._created_at" not in inspect.getsource(SwarmConn.__init__):
        raise Libp2pLimitsCompatError("SwarmConn no longer records _created_at")
    handle = inspect.getsource(Swarm._handle_inbound_connection)
    do_handle = inspect.getsource(Swarm._do_handle_inbound_connection)
    if "_do_handle_inbound_connection" not in handle or (
        "self.upgrade_inbound_raw_conn(" not in do_handle
    ):
        raise Libp2pLimitsCompatError(
            "Swarm's inbound path no longer runs _do_handle_inbound_connection → "
            "upgrade_inbound_raw_conn: update meshnode.p2p.limits"
        )
    if "self.auto_connector.maybe_connect" not in inspect.getsource(
        Swarm._schedule_auto_connect
    ) or "self.maybe_connect" not in inspect.getsource(AutoConnector):
        raise Libp2pLimitsCompatError("AutoConnector no longer dials via maybe_connect")
    if "read_length_prefixed_protobuf(" not in inspect.getsource(
        basic_host.BasicHost._identify_peer
    ):
        raise Libp2pLimitsCompatError(
            "BasicHost._identify_peer no longer reads via read_length_prefixed_protobuf"
        )


# ── handshake slots (no I/O: entries carry a callback that drops the socket) ─────────


@dataclass(eq=False)
class _Pending:
    ip: str | None
    drop: Callable[[], None]


@dataclass
class HandshakeSlots:
    """Pending inbound handshakes, oldest first.

    A socket from an IP that already has ``per_ip`` pending is refused (cheaply, before
    any handshake work); when all ``total`` slots are taken, the oldest pending
    handshake is dropped, so a newcomer from another address always gets room."""

    total: int = MAX_PENDING_HANDSHAKES
    per_ip: int = MAX_PENDING_HANDSHAKES_PER_IP
    pending: list[_Pending] = field(default_factory=list)
    dropped: int = 0
    refused: int = 0

    def admit(self, ip: str | None, drop: Callable[[], None]) -> _Pending | None:
        if limited_ip(ip) and sum(1 for p in self.pending if p.ip == ip) >= self.per_ip:
            self.refused += 1
            return None
        if len(self.pending) >= self.total:
            oldest = self.pending.pop(0)
            self.dropped += 1
            oldest.drop()
        entry = _Pending(ip, drop)
        self.pending.append(entry)
        return entry

    def finish(self, entry: _Pending) -> None:
        if entry in self.pending:
            self.pending.remove(entry)


# ── inbound admission wired into one Swarm ───────────────────────────────────────────


@dataclass(eq=False)
class _Inbound:
    ip: str | None
    socket: Any
    upgraded: trio.Event = field(default_factory=trio.Event)
    closed: trio.Event | None = None
    slot: _Pending | None = None

    def drop(self) -> None:
        """Close the socket under the handshake: py-libp2p's own failure path then runs
        (and releases what it holds, which cancelling the handshake task would not)."""
        sock = getattr(getattr(self.socket, "stream", None), "socket", None)
        if sock is not None:
            sock.close()


_inbound: contextvars.ContextVar[_Inbound | None] = contextvars.ContextVar(
    "meshnode_inbound", default=None
)


def _remote_ip(conn: Any) -> str | None:
    try:
        address = conn.get_remote_address()
    except Exception:  # a transport without addresses (a relayed stream): no IP to limit
        return None
    if not address:
        return None
    return str(address[0])


def limited_ip(ip: str | None) -> bool:
    """Whether per-IP limits apply to connections from ``ip`` (see ``EXEMPT_IPS``)."""
    return ip is not None and ip not in EXEMPT_IPS


def peer_ips(host: IHost, peer: ID) -> set[str]:
    """The IP addresses ``peer`` is connected to us from (empty when unknown)."""
    ips = set()
    for conn in host.get_network().connections.get(peer) or []:
        ip = _remote_ip(conn.muxed_conn)
        if ip is not None:
            ips.add(ip)
    return ips


def connections_from(network: INetwork, ip: str | None) -> int:
    if ip is None:
        return 0
    return sum(
        1
        for conns in network.connections.values()
        for conn in conns
        if _remote_ip(conn.muxed_conn) == ip
    )


class InboundGuard:
    """Replaces a Swarm's inbound handler with one that enforces the limits above."""

    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self.slots = HandshakeSlots()
        self.refused = 0
        self.trimmed = 0
        self._upgrade = swarm.upgrade_inbound_raw_conn

    def install(self) -> None:
        self.swarm._handle_inbound_connection = self.handle  # type: ignore[method-assign]
        self.swarm.upgrade_inbound_raw_conn = self.upgrade  # type: ignore[method-assign]

    async def handle(self, read_write_closer: Any, maddr: Multiaddr) -> None:
        ip = _remote_ip(read_write_closer)
        full = (
            limited_ip(ip)
            and connections_from(self.swarm, ip) >= MAX_CONNECTIONS_PER_IP
            and not await self._close_oldest_idle(ip)
        ) or (
            len(self.swarm.get_connections()) >= MAX_CONNECTIONS
            and not await self._close_oldest_idle(None)
        )
        if full:
            self.refused += 1
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                await read_write_closer.close()
            return
        state = _Inbound(ip, read_write_closer)
        entry = self.slots.admit(ip, state.drop)
        if entry is None:
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                await read_write_closer.close()
            return
        state.slot = entry
        token = _inbound.set(state)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._release_when_closed, state, nursery.cancel_scope)
                # py-libp2p holds this call until the swarm stops; _release_when_closed
                # ends it when the connection closes, freeing the task.
                await self.swarm._do_handle_inbound_connection(
                    read_write_closer, maddr, SwarmEvent()
                )
                nursery.cancel_scope.cancel()
        finally:
            self.slots.finish(entry)
            _inbound.reset(token)

    async def _close_oldest_idle(self, ip: str | None) -> bool:
        """Close the oldest inbound connection (from ``ip``, if given) that has had no
        open stream since ``IDLE_GRACE_S`` after it was set up; False if there is none."""
        now = time.time()
        idle = [
            conn
            for conn in self.swarm.get_connections()
            if getattr(conn, "direction", None) == Direction.INBOUND
            and not conn.get_streams()
            and now - getattr(conn, "_created_at", now) >= IDLE_GRACE_S
            and (ip is None or _remote_ip(conn.muxed_conn) == ip)
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda conn: getattr(conn, "_created_at", now))
        self.trimmed += 1
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S) as cleanup:
            cleanup.shield = True
            await oldest.close()
        return True

    @staticmethod
    async def _release_when_closed(state: _Inbound, scope: trio.CancelScope) -> None:
        await state.upgraded.wait()
        if state.closed is not None:
            await state.closed.wait()
            scope.cancel()

    async def upgrade(self, raw_conn: Any, maddr: Multiaddr) -> Any:
        state = _inbound.get()
        if state is None:  # not reached through ``handle`` (e.g. a relay's circuit)
            return await self._upgrade(raw_conn, maddr)
        try:
            # py-libp2p applies HANDSHAKE_TIMEOUT_S (connection_config's
            # inbound_upgrade_timeout) inside this call.
            muxed = await self._upgrade(raw_conn, maddr)
        finally:
            if state.slot is not None:
                self.slots.finish(state.slot)
        if limited_ip(state.ip) and connections_from(self.swarm, state.ip) > (
            MAX_CONNECTIONS_PER_IP
        ):
            self.refused += 1
            await muxed.close()
            raise SwarmException("too many connections from one IP address")
        state.closed = getattr(muxed, "event_closed", None)
        state.upgraded.set()
        return muxed


# ── identify ─────────────────────────────────────────────────────────────────────────


async def read_identify(
    stream: INetStream, use_varint_format: bool = True, max_length: int = MAX_IDENTIFY_BYTES
) -> bytes:
    """``read_length_prefixed_protobuf`` capped at ``MAX_IDENTIFY_BYTES``; on a refusal the
    stream is reset, so py-libp2p's fallback of reading the raw stream reads nothing."""
    try:
        return await read_length_prefixed_protobuf(
            stream, use_varint_format, min(max_length, MAX_IDENTIFY_BYTES)
        )
    except Exception:
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
            await stream.reset()
        raise


def identify_push_handler(host: IHost) -> Callable[[INetStream], Any]:
    """An identify-push handler that reads at most ``MAX_IDENTIFY_BYTES``."""

    async def handle(stream: INetStream) -> None:
        peer_id = stream.muxed_conn.peer_id
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT_S):
                data = await read_identify(stream)
            message = Identify()
            message.ParseFromString(data)
            await update_peerstore_from_identify(host.get_peerstore(), peer_id, message)
        except Exception as exc:  # a peer's bad push costs that push, never the host
            log.debug("identify push refused (%s)", type(exc).__name__)
            with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
                await stream.reset()
            return
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
            await stream.close()

    return handle


class ForgetDepartedPeers(INotifee):
    """Drops what identify stored about a peer that dialed us, once it has left."""

    def __init__(self, host: IHost) -> None:
        self.host = host

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        peer: ID = conn.muxed_conn.peer_id
        if network.get_connections(peer):
            return
        if getattr(conn, "direction", None) != Direction.INBOUND:
            return  # we dialed it: keep what we know, we may dial it again
        forget_peer(self.host, peer)

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        pass

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        pass


def forget_peer(host: IHost, peer: ID) -> None:
    store: Any = host.get_peerstore()
    data = store.peer_data_map.get(peer)
    if data is None:
        return
    store.clear_protocol_data(peer)
    store.clear_metadata(peer)
    store.peer_record_map.pop(peer, None)
    addrs = data.get_addrs()
    if len(addrs) > MAX_ADDRS_KEPT_AFTER_DISCONNECT:
        data.clear_addrs()
        data.add_addrs(addrs[:MAX_ADDRS_KEPT_AFTER_DISCONNECT])


# ── the one entry point ──────────────────────────────────────────────────────────────


def install(host: IHost) -> InboundGuard:
    """Apply every limit of this module to ``host`` (built but not yet running)."""
    check_compatible()
    network = host.get_network()
    if not isinstance(network, Swarm):
        raise Libp2pLimitsCompatError(f"expected a py-libp2p Swarm, got {type(network)}")
    config = network.connection_config
    if (config.max_connections, config.max_connections_per_peer) != (
        MAX_CONNECTIONS,
        MAX_CONNECTIONS_PER_PEER,
    ):
        raise ValueError("build the host with meshnode.p2p.host.connection_config()")
    _switch_off_auto_connector(network)
    guard = InboundGuard(network)
    guard.install()
    basic_host.read_length_prefixed_protobuf = read_identify  # type: ignore[attr-defined]
    host.set_stream_handler(ID_PUSH, identify_push_handler(host))
    network.register_notifee(ForgetDepartedPeers(host))
    return guard


def _switch_off_auto_connector(network: Swarm) -> None:
    async def never_dial() -> None:
        return None

    network.auto_connector.maybe_connect = never_dial  # type: ignore[method-assign]
