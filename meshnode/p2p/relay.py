"""Circuit relay v2: reach providers that cannot accept inbound connections.

Bootstrap nodes run a relay server (the "hop" role). A provider behind NAT connects to
one, reserves a slot, and advertises ``<relay addr>/p2p-circuit/p2p/<its id>``. A client
dials that address: the relay joins two streams, and the client and provider then run
Noise and yamux *over* the joined stream, so the relay forwards ciphertext only (job
payloads are additionally sealed end to end to the provider's job key).

py-libp2p 0.8.1 constraints handled here:
- ``Swarm.dial_peer`` skips every ``/p2p-circuit`` address ("this node has no relay
  transport"), so ``host.connect`` never uses a relay. ``RelayClient.dial`` calls the
  circuit transport directly; the connection it returns is registered with the swarm,
  so ``host.new_stream`` to that peer reuses it.
- ``BasicHost.get_addrs`` strips everything after the first ``/p2p/`` of an announced
  address, which mangles circuit addresses; circuit addresses therefore travel in the
  signed advert (``RelayClient.circuit_addrs``), not in identify or DHT provider records.
- the circuit transport reserves a slot on *every* dial when the CLIENT role is on;
  dialers here run with the STOP role only, and reserve explicitly.
- ``RelayResourceManager`` counts reservations of peers that disconnected until they
  expire, and takes the reserving peer id from the request (a peer may name another);
  ``BoundedRelayResources`` replaces it on our relay servers (see its docstring).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits, RelayResourceManager
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from meshnode.p2p.host import parse_peer_addr
from meshnode.p2p.limits import limited_ip, peer_ips

log = logging.getLogger(__name__)

# A relayed connection carries a client's jobs to one provider; a long generation runs
# for minutes, so circuits live half an hour before the client must re-dial.
RELAY_CIRCUIT_DURATION_S = 30 * 60
# Prompts and token streams are small (1 MiB frame cap); 64 MiB per circuit serves
# hundreds of jobs while bounding what one circuit costs the relay operator.
RELAY_CIRCUIT_BYTES = 64 * 1024 * 1024
# Concurrent circuits into one reserved provider: its job slots are a handful, so more
# than 16 waiting clients only queue there.
RELAY_MAX_CIRCUITS_PER_PEER = 16
# Providers one bootstrap relay holds slots for; beyond this they must use another relay.
RELAY_MAX_RESERVATIONS = 128
# Reservations lapse after 2 min unless refreshed (py-libp2p refreshes 30 s before
# expiry: one small round trip every 90 s per provider). A provider that vanished frees
# its slot at once anyway (``BoundedRelayResources``); this bounds a slot whose holder
# is still connected but gone quiet. It was 15 min: 128 throwaway peers held every slot.
RELAY_RESERVATION_TTL_S = 2 * 60
# Reservations held by peers behind one IP address: a few providers behind one NAT;
# beyond that one machine is collecting slots with throwaway peer ids.
RELAY_MAX_RESERVATIONS_PER_IP = 4
# Connecting to the relay and one HOP round trip.
RESERVE_TIMEOUT_S = 15.0
# Relay dial + CONNECT round trip + STOP round trip + Noise and yamux over the circuit.
RELAY_DIAL_TIMEOUT_S = 20.0
# Registering two stream handlers; only a wedged host takes longer.
START_TIMEOUT_S = 10.0

RELAY_LIMITS = RelayLimits(
    duration=RELAY_CIRCUIT_DURATION_S,
    data=RELAY_CIRCUIT_BYTES,
    max_circuit_conns=RELAY_MAX_CIRCUITS_PER_PEER,
    max_reservations=RELAY_MAX_RESERVATIONS,
    reservation_ttl=RELAY_RESERVATION_TTL_S,
)


class RelayError(Exception):
    """A relay reservation or dial failed; the message says which and why."""


def circuit_addr(relay_addr: str, peer_id: str) -> str:
    """``/ip4/.../tcp/.../p2p/<relay>/p2p-circuit/p2p/<peer>``: a peer behind a relay."""
    parse_peer_addr(relay_addr)  # raises ValueError for an undialable relay address
    return f"{relay_addr}/p2p-circuit/p2p/{peer_id}"


def is_circuit_addr(addr: str) -> bool:
    return "/p2p-circuit" in addr


class BoundedRelayResources(RelayResourceManager):
    """py-libp2p's relay bookkeeping, with slots that follow the peers holding them.

    - A reservation counts only while its peer is connected to us (the circuit v2 spec
      already says it is valid only then): one that left frees its slot at once.
    - A reservation is granted only to a peer connected to us; a request naming another
      peer id books for its sender (``OwnReservationsRelay``).
    - At most ``per_ip`` reservations belong to peers behind one IP address (not counting
      ``limits.EXEMPT_IPS``, the relay's own machine).
    - One reservation per peer id (py-libp2p keys them by peer id).
    """

    def __init__(
        self, limits: RelayLimits, host: IHost, per_ip: int = RELAY_MAX_RESERVATIONS_PER_IP
    ) -> None:
        super().__init__(limits, host)
        self.per_ip = per_ip

    def _clean_expired(self) -> None:
        super()._clean_expired()
        for peer_id in [p for p in self._reservations if not self._is_peer_connected(p)]:
            del self._reservations[peer_id]

    def can_accept_reservation(self, peer_id: ID) -> bool:
        self._clean_expired()
        if not self._is_peer_connected(peer_id):
            return False
        if peer_id in self._reservations:
            return True
        if len(self._reservations) >= self.limits.max_reservations:
            return False
        assert self.host is not None
        ips = {ip for ip in peer_ips(self.host, peer_id) if limited_ip(ip)}
        same_ip = sum(1 for p in self._reservations if peer_ips(self.host, p) & ips)
        return same_ip < self.per_ip


class OwnReservationsRelay(CircuitV2Protocol):
    """py-libp2p 0.8.1's relay books a RESERVE for the peer id named in the message when
    one is given. A connected stranger could then take every slot in other connected
    peers' names (and charge them to those peers' IPs). Here a reservation is always for
    the peer that sent it: the named id is dropped and py-libp2p falls back to the
    stream's remote peer."""

    async def _handle_reserve(self, stream: INetStream, msg: HopMessage) -> None:
        if msg.HasField("peer"):
            msg.ClearField("peer")
        await super()._handle_reserve(stream, msg)


if not callable(getattr(CircuitV2Protocol, "_handle_reserve", None)):
    raise ImportError("CircuitV2Protocol._handle_reserve is gone (py-libp2p changed): "
                      "update meshnode.p2p.relay.OwnReservationsRelay")


@asynccontextmanager
async def running_relay_server(
    host: IHost, limits: RelayLimits = RELAY_LIMITS
) -> AsyncIterator[CircuitV2Protocol]:
    """Serve as a relay (HOP) for the block; ``limits`` other than the default are for
    tests that need a small relay."""
    protocol = OwnReservationsRelay(host, limits=limits, allow_hop=True)
    protocol.resource_manager = BoundedRelayResources(limits, host)
    async with background_trio_service(protocol):
        with trio.fail_after(START_TIMEOUT_S):
            await protocol.event_started.wait()
        yield protocol


class RelayClient:
    """Accepts relayed connections (STOP), reserves slots, and dials through relays."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self.protocol = CircuitV2Protocol(host, allow_hop=False)
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=RelayRole.STOP))
        self._circuits: list[str] = []

    @property
    def circuit_addrs(self) -> list[str]:
        """Circuit addresses of this host through every relay it holds a slot on."""
        return list(self._circuits)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[RelayClient]:
        async with background_trio_service(self.protocol):
            with trio.fail_after(START_TIMEOUT_S):
                await self.protocol.event_started.wait()
            yield self

    async def reserve(self, relay_addr: str, nursery: trio.Nursery) -> str:
        """Reserve a slot on the relay at ``relay_addr``; the circuit address to
        advertise. The reservation is refreshed by a task in ``nursery``."""
        info = parse_peer_addr(relay_addr)
        try:
            with trio.fail_after(RESERVE_TIMEOUT_S):
                await self.host.connect(info)
                stream = await self.host.new_stream(info.peer_id, [HOP_PROTOCOL_ID])
                try:
                    ok = await self.transport.reserve(stream, info.peer_id, nursery)
                finally:
                    await stream.close()
        except trio.TooSlowError as exc:
            raise RelayError(
                f"relay {relay_addr} did not answer within {RESERVE_TIMEOUT_S:.0f} s"
            ) from exc
        except RelayError:
            raise
        except Exception as exc:
            raise RelayError(f"could not reach relay {relay_addr}: {exc}") from exc
        if not ok:
            raise RelayError(
                f"relay {relay_addr} refused a reservation (full, or not a relay server)"
            )
        addr = circuit_addr(relay_addr, self.host.get_id().to_base58())
        if addr not in self._circuits:
            self._circuits.append(addr)
        return addr

    async def dial(self, addr: str) -> ID:
        """Connect to the peer behind a circuit address; its peer id. Afterwards
        ``host.new_stream`` to that peer runs over the relayed connection."""
        if not is_circuit_addr(addr):
            raise ValueError(f"not a circuit address: {addr!r}")
        try:
            maddr = multiaddr.Multiaddr(addr)
            _, target = self.transport.parse_circuit_ma(maddr)
        except Exception as exc:
            raise ValueError(f"not a circuit address: {addr!r} ({exc})") from exc
        try:
            with trio.fail_after(RELAY_DIAL_TIMEOUT_S):
                await self.transport.dial(maddr)
        except trio.TooSlowError as exc:
            raise RelayError(
                f"circuit {addr} not established within {RELAY_DIAL_TIMEOUT_S:.0f} s"
            ) from exc
        except Exception as exc:
            raise RelayError(f"circuit {addr} failed: {exc}") from exc
        return target
