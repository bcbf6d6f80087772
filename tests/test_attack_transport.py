"""A stranger's transport-level tricks cost a node bounded memory and never lock others out.

Each attack runs against real py-libp2p hosts on loopback; after (or during) each one, a
legitimate peer's request still completes.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from meshnode.identity import NodeIdentity
from meshnode.p2p.host import full_addrs, parse_peer_addr, running_host
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
    pushed = 64 * MIB
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
