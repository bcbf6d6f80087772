"""A stranger's transport-level tricks cost a node bounded memory and never lock others out.

Each attack runs against real py-libp2p hosts on loopback; after (or during) each one, a
legitimate peer's request still completes.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.identity.identify_push.identify_push import ID_PUSH
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.utils.varint import encode_uvarint

from meshnode.identity import NodeIdentity
from meshnode.p2p import limits
from meshnode.p2p.host import full_addrs, parse_peer_addr, running_host
from meshnode.p2p.limits import (
    HANDSHAKE_TIMEOUT_S,
    IDLE_GRACE_S,
    MAX_CONNECTIONS_PER_IP,
    MAX_IDENTIFY_BYTES,
    HandshakeSlots,
    connections_from,
)
from meshnode.p2p.relay import (
    RELAY_LIMITS,
    RELAY_MAX_RESERVATIONS_PER_IP,
    RelayClient,
    RelayError,
    running_relay_server,
)
from meshnode.p2p.yamux_guard import (
    MAX_BUFFERED_PER_CONNECTION,
    MAX_STREAM_WINDOW,
    MAX_WINDOW_VIOLATIONS,
)

ECHO = TProtocol("/meshnode-test/echo/1")
# A handler that accepts a stream and never reads it: where pushed bytes pile up.
SINK = TProtocol("/meshnode-test/never-reads/1")
MIB = 1024 * 1024
# Every wait in these tests; loopback answers in milliseconds even on a loaded 2-core box.
WAIT_S = 10.0


async def _echo(stream: INetStream) -> None:
    await stream.write(b"echo:" + await stream.read(64))
    await stream.close()


async def _never_read(stream: INetStream) -> None:
    await trio.sleep_forever()


@pytest.fixture
def loopback_is_a_stranger(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-IP limits exempt the node's own machine; these tests need them on 127.0.0.1,
    the only source address a libp2p host can dial from here."""
    monkeypatch.setattr(limits, "EXEMPT_IPS", frozenset())


@asynccontextmanager
async def _node() -> AsyncIterator[IHost]:
    async with running_host(NodeIdentity.generate()) as host:
        host.set_stream_handler(ECHO, _echo)
        host.set_stream_handler(SINK, _never_read)
        yield host


async def _connect(client: IHost, node: IHost) -> ID:
    info = parse_peer_addr(full_addrs(node)[0])
    with trio.fail_after(WAIT_S):
        await client.connect(info)
    return info.peer_id


async def _echo_roundtrip(client: IHost, node: IHost) -> bytes:
    peer = await _connect(client, node)
    with trio.fail_after(WAIT_S):
        stream = await client.new_stream(peer, [ECHO])
        await stream.write(b"hi")
        return await stream.read(64)


def _buffered_bytes(node: IHost) -> int:
    """Unread bytes all yamux streams of ``node`` hold, measured inside the process."""
    total = 0
    for conns in node.get_network().connections.values():
        for conn in conns:
            buffers = getattr(conn.muxed_conn, "stream_buffers", {})
            total += sum(len(b) for b in buffers.values())
    return total


async def _push_ignoring_window(attacker: IHost, peer: ID, total: int) -> None:
    """Write raw yamux DATA frames on a fresh SINK stream, ignoring the peer's window."""
    stream = await attacker.new_stream(peer, [SINK])
    assert MAX_STREAM_WINDOW < total
    muxed = stream.muxed_conn
    chunk = 64 * 1024
    header = struct.pack("!BBHII", 0, 0, 0, stream.muxed_stream.stream_id, chunk)  # type: ignore[attr-defined]
    frame = header + b"\0" * chunk
    for _ in range(total // chunk):
        if muxed.is_closed:
            return
        try:
            await muxed._write_frame(frame)  # type: ignore[attr-defined]
        except Exception:  # the node closed the connection on us: that is the point
            return


@pytest.mark.slow
async def test_bytes_pushed_past_the_yamux_window_are_not_buffered() -> None:
    pushed = 32 * MIB  # twice the bound; the 2 MiB window makes any more redundant
    async with _node() as node, running_host(NodeIdentity.generate()) as attacker:
        async with running_host(NodeIdentity.generate()) as client:
            peer = await _connect(attacker, node)
            peak = 0
            async with trio.open_nursery() as nursery:
                done = trio.Event()

                async def attack() -> None:
                    with trio.fail_after(60):
                        await _push_ignoring_window(attacker, peer, pushed)
                    done.set()

                nursery.start_soon(attack)
                replies = []
                while not done.is_set():
                    peak = max(peak, _buffered_bytes(node))
                    replies.append(await _echo_roundtrip(client, node))
                    await trio.sleep(0.05)
                peak = max(peak, _buffered_bytes(node))
    assert peak <= MAX_BUFFERED_PER_CONNECTION < 16 * MIB, f"buffered {peak / MIB:.1f} MiB"
    assert replies and all(r == b"echo:hi" for r in replies)


@pytest.mark.slow
async def test_a_peer_that_keeps_overrunning_windows_is_disconnected() -> None:
    async with _node() as node, running_host(NodeIdentity.generate()) as attacker:
        peer = await _connect(attacker, node)
        for _ in range(MAX_WINDOW_VIOLATIONS):  # each push overruns a fresh stream's window
            await _push_ignoring_window(attacker, peer, 4 * MIB)
        with trio.fail_after(WAIT_S):
            while node.get_network().connections.get(attacker.get_id()):
                await trio.sleep(0.05)
        async with running_host(NodeIdentity.generate()) as client:
            assert await _echo_roundtrip(client, node) == b"echo:hi"


# ── idle sockets ─────────────────────────────────────────────────────────────────────

# Raw sockets that never handshake: more than py-libp2p's own cap of 300 slots, as measured.
IDLE_SOCKETS = 400
# Attacker source addresses (any 127.0.0.0/8 address works on loopback); the legitimate
# client dials from 127.0.0.1.
ATTACKER_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")
# An attacker re-opens a dropped socket after this (a tight loop only burns the CPU this
# test shares with the node it attacks).
REOPEN_DELAY_S = 0.25
# A legitimate peer gets in within this, attack or not (it takes ~50 ms when idle).
LEGIT_CONNECT_BOUND_S = 5.0


async def _hold_idle_socket(ip: str, port: int, opened: list[int]) -> None:
    """Open a TCP socket from ``ip`` that never speaks; re-open it whenever it is dropped."""
    while True:
        sock = trio.socket.socket()
        try:
            await sock.bind((ip, 0))
            await sock.connect(("127.0.0.1", port))
            opened[0] += 1
            while await sock.recv(4096):  # multistream greeting, then EOF when dropped
                pass
        except OSError:
            pass
        finally:
            sock.close()
        await trio.sleep(REOPEN_DELAY_S)


def _tcp_port(host: IHost) -> int:
    return int(str(host.get_addrs()[0]).split("/tcp/")[1].split("/")[0])


@pytest.mark.slow
async def test_idle_sockets_that_never_handshake_do_not_lock_out_a_real_peer() -> None:
    async with _node() as node, running_host(NodeIdentity.generate()) as client:
        opened = [0]
        async with trio.open_nursery() as attack:
            for i in range(IDLE_SOCKETS):
                attack.start_soon(
                    _hold_idle_socket, ATTACKER_IPS[i % len(ATTACKER_IPS)], _tcp_port(node), opened
                )
            with trio.fail_after(WAIT_S):
                while opened[0] < IDLE_SOCKETS:
                    await trio.sleep(0.05)
            started = trio.current_time()
            with trio.fail_after(LEGIT_CONNECT_BOUND_S):
                reply = await _echo_roundtrip(client, node)
            took = trio.current_time() - started
            attack.cancel_scope.cancel()
    assert reply == b"echo:hi"
    assert took < LEGIT_CONNECT_BOUND_S


@pytest.mark.slow
async def test_a_handshake_that_stalls_is_dropped_after_the_handshake_timeout() -> None:
    async with _node() as node:
        sock = trio.socket.socket()
        with sock:
            await sock.connect(("127.0.0.1", _tcp_port(node)))
            started = trio.current_time()
            with trio.fail_after(HANDSHAKE_TIMEOUT_S + WAIT_S):
                while await sock.recv(4096):
                    pass
            took = trio.current_time() - started
    assert HANDSHAKE_TIMEOUT_S - 0.5 <= took < HANDSHAKE_TIMEOUT_S + 2.0


def test_a_new_handshake_from_another_address_always_finds_room() -> None:
    slots = HandshakeSlots(total=4, per_ip=2)
    dropped: list[str] = []
    for name, ip in [("a1", "a"), ("a2", "a"), ("b1", "b"), ("c1", "c")]:
        assert slots.admit(ip, lambda name=name: dropped.append(name)) is not None  # type: ignore[misc]
    assert slots.admit("a", lambda: dropped.append("a3")) is None  # "a" used its budget
    assert slots.admit("d", lambda: dropped.append("d1")) is not None  # full: oldest goes
    assert dropped == ["a1"]
    assert [p.ip for p in slots.pending] == ["a", "b", "c", "d"]


@pytest.mark.slow
@pytest.mark.usefixtures("loopback_is_a_stranger")
async def test_one_address_cannot_hold_more_than_its_share_of_busy_connections() -> None:
    async with _node() as node, AsyncExitStack() as stack:
        admitted = 0
        for _ in range(MAX_CONNECTIONS_PER_IP + 2):  # fresh peer ids, all from 127.0.0.1
            peer = await stack.enter_async_context(running_host(NodeIdentity.generate()))
            try:
                node_id = await _connect(peer, node)
                with trio.fail_after(WAIT_S):
                    await peer.new_stream(node_id, [SINK])  # held open: not idle
                admitted += await _echo_roundtrip(peer, node) == b"echo:hi"
            except Exception:  # refused at accept: the dial or the stream fails
                pass
        from_loopback = connections_from(node.get_network(), "127.0.0.1")
    assert admitted == from_loopback == MAX_CONNECTIONS_PER_IP


@pytest.mark.slow
@pytest.mark.usefixtures("loopback_is_a_stranger")
async def test_idle_connections_from_one_address_make_room_for_a_newcomer() -> None:
    async with _node() as node, AsyncExitStack() as stack:
        for _ in range(MAX_CONNECTIONS_PER_IP):  # idle peers, all from 127.0.0.1
            idler = await stack.enter_async_context(running_host(NodeIdentity.generate()))
            await _connect(idler, node)
        full = connections_from(node.get_network(), "127.0.0.1")
        await trio.sleep(IDLE_GRACE_S)
        async with running_host(NodeIdentity.generate()) as newcomer:
            reply = await _echo_roundtrip(newcomer, node)
            after = connections_from(node.get_network(), "127.0.0.1")
    assert full == MAX_CONNECTIONS_PER_IP
    assert reply == b"echo:hi"
    assert after == MAX_CONNECTIONS_PER_IP  # one idle connection made room


def _live_tasks() -> int:
    count, stack = 0, [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


@pytest.mark.slow
async def test_clients_that_come_and_go_leave_no_task_behind() -> None:
    # py-libp2p 0.8.1 kept each inbound connection's handler task (and its slot of the
    # 300-slot inbound limiter) until the node stopped: after 300 visits, no one got in.
    async with _node() as node:
        async with running_host(NodeIdentity.generate()) as client:
            assert await _echo_roundtrip(client, node) == b"echo:hi"
        await trio.sleep(0.5)
        baseline = _live_tasks()
        for _ in range(10):
            async with running_host(NodeIdentity.generate()) as client:
                assert await _echo_roundtrip(client, node) == b"echo:hi"
        await trio.sleep(0.5)
        assert _live_tasks() <= baseline


# ── redials ──────────────────────────────────────────────────────────────────────────

DEPARTED_CLIENTS = 5


@pytest.mark.slow
async def test_a_node_never_redials_clients_that_connected_and_left() -> None:
    async with _node() as node:
        network = node.get_network()
        dials: list[ID] = []
        real_dial_peer = network.dial_peer

        async def counting_dial_peer(peer_id: ID) -> list[Any]:
            dials.append(peer_id)
            return await real_dial_peer(peer_id)

        network.dial_peer = counting_dial_peer  # type: ignore[method-assign]
        for _ in range(DEPARTED_CLIENTS):
            async with running_host(NodeIdentity.generate()) as client:
                assert await _echo_roundtrip(client, node) == b"echo:hi"
                await trio.sleep(0.2)  # let identify run, as in a real session
        # py-libp2p's auto-connector backs off a departed peer for 60 s, then dials it on
        # its next 30 s tick. Compress that: no back-off, and run the tick now.
        connector: Any = network.auto_connector
        connector._disconnect_backoff = 0.0
        with trio.fail_after(WAIT_S):
            await connector.maybe_connect()
        async with running_host(NodeIdentity.generate()) as client:
            assert await _echo_roundtrip(client, node) == b"echo:hi"
    assert dials == []


# ── identify ─────────────────────────────────────────────────────────────────────────


async def _push_identify(attacker: IHost, peer: ID, protocols: list[str]) -> None:
    message = Identify(protocols=protocols)
    body = message.SerializeToString()
    with trio.fail_after(WAIT_S):
        stream = await attacker.new_stream(peer, [ID_PUSH])
        try:
            await stream.write(encode_uvarint(len(body)) + body)
            await stream.close()
        except (MuxedStreamError, StreamError):  # the node reset the stream: refused
            pass


def _stored_protocol_bytes(node: IHost, peer: ID) -> int:
    try:
        return sum(len(p) for p in node.get_peerstore().get_protocols(peer))
    except Exception:  # the peerstore forgot the peer altogether
        return 0


@pytest.mark.slow
async def test_an_oversized_identify_push_is_refused_and_nothing_is_kept_after_leaving() -> None:
    bulky = [f"/junk/{i:06d}/" + "x" * 1000 for i in range(900)]  # ~0.9 MiB
    async with _node() as node:
        async with running_host(NodeIdentity.generate()) as attacker:
            peer = await _connect(attacker, node)
            await _push_identify(attacker, peer, ["/meshnode-test/small/1"])
            with trio.fail_after(WAIT_S):  # a normal push is still applied
                while "/meshnode-test/small/1" not in node.get_peerstore().get_protocols(
                    attacker.get_id()
                ):
                    await trio.sleep(0.05)
            await _push_identify(attacker, peer, bulky)
            await trio.sleep(0.5)
            while_connected = _stored_protocol_bytes(node, attacker.get_id())
            attacker_id = attacker.get_id()
        with trio.fail_after(WAIT_S):
            while node.get_network().connections.get(attacker_id):
                await trio.sleep(0.05)
        await trio.sleep(0.2)
        after_leaving = _stored_protocol_bytes(node, attacker_id)
        async with running_host(NodeIdentity.generate()) as client:
            assert await _echo_roundtrip(client, node) == b"echo:hi"
    assert while_connected < MAX_IDENTIFY_BYTES
    assert after_leaving == 0


# ── relay slots ──────────────────────────────────────────────────────────────────────

# A relay scaled down for the test: same code, 4 slots instead of 128.
SMALL_RELAY = RelayLimits(
    duration=RELAY_LIMITS.duration,
    data=RELAY_LIMITS.data,
    max_circuit_conns=RELAY_LIMITS.max_circuit_conns,
    max_reservations=4,
    reservation_ttl=RELAY_LIMITS.reservation_ttl,
)


async def _reserve_once(host: IHost, relay_addr: str) -> str:
    refused: RelayError | None = None
    async with RelayClient(host).running() as relay_client, trio.open_nursery() as nursery:
        try:
            addr = await relay_client.reserve(relay_addr, nursery)
        except RelayError as exc:  # raised below, outside the nurseries
            refused = exc
        nursery.cancel_scope.cancel()  # no refresh: a throwaway peer does not bother
    if refused is not None:
        raise refused
    return addr


@pytest.mark.slow
async def test_relay_slots_of_peers_that_left_go_to_a_real_provider() -> None:
    async with running_host(NodeIdentity.generate()) as relay_host:
        async with running_relay_server(relay_host, SMALL_RELAY):
            relay_addr = full_addrs(relay_host)[0]
            for _ in range(SMALL_RELAY.max_reservations + 2):  # reserve, then leave
                async with running_host(NodeIdentity.generate(), listen=None) as throwaway:
                    await _reserve_once(throwaway, relay_addr)
            async with (
                running_host(NodeIdentity.generate(), listen=None) as provider,
                RelayClient(provider).running() as provider_relay,
                trio.open_nursery() as refresher,
            ):
                provider.set_stream_handler(ECHO, _echo)
                circuit = await provider_relay.reserve(relay_addr, refresher)
                async with running_host(NodeIdentity.generate()) as client:
                    async with RelayClient(client).running() as dialer:
                        peer = await dialer.dial(circuit)
                        with trio.fail_after(WAIT_S):
                            stream = await client.new_stream(peer, [ECHO])
                            await stream.write(b"hi")
                            reply = await stream.read(64)
                refresher.cancel_scope.cancel()
    assert reply == b"echo:hi"


@pytest.mark.slow
@pytest.mark.usefixtures("loopback_is_a_stranger")
async def test_one_address_cannot_hold_more_than_its_share_of_relay_slots() -> None:
    async with running_host(NodeIdentity.generate()) as relay_host:
        async with running_relay_server(relay_host), AsyncExitStack() as stack:
            relay_addr = full_addrs(relay_host)[0]
            for _ in range(RELAY_MAX_RESERVATIONS_PER_IP):  # these stay connected
                peer = await stack.enter_async_context(
                    running_host(NodeIdentity.generate(), listen=None)
                )
                await _reserve_once(peer, relay_addr)
            async with running_host(NodeIdentity.generate(), listen=None) as one_too_many:
                with pytest.raises(RelayError, match="refused"):
                    await _reserve_once(one_too_many, relay_addr)


@pytest.mark.slow
async def test_a_reservation_naming_another_peer_books_only_for_its_sender() -> None:
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage
    from libp2p.relay.circuit_v2.pb.circuit_pb2 import PeerId as CircuitPeerId
    from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
    from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg

    async with running_host(NodeIdentity.generate()) as relay_host:
        async with running_relay_server(relay_host, SMALL_RELAY) as relay:
            relay_info = parse_peer_addr(full_addrs(relay_host)[0])
            async with (
                running_host(NodeIdentity.generate(), listen=None) as victim,
                running_host(NodeIdentity.generate(), listen=None) as attacker,
            ):
                await victim.connect(relay_info)
                await attacker.connect(relay_info)
                stream = await attacker.new_stream(relay_info.peer_id, [HOP_PROTOCOL_ID])
                await write_delimited_msg(stream, HopMessage(
                    type=HopMessage.RESERVE,
                    peer=CircuitPeerId(id=victim.get_id().to_bytes())))
                with trio.fail_after(WAIT_S):
                    await read_delimited_msg(stream, HopMessage)
                booked = set(relay.resource_manager._reservations)
                await stream.close()
    assert victim.get_id() not in booked
    assert attacker.get_id() in booked
