"""Job streams open with one multistream-select round trip, against py-libp2p listeners."""

from __future__ import annotations

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from meshnode.identity import NodeIdentity
from meshnode.p2p.host import full_addrs, parse_peer_addr, running_host
from meshnode.p2p.stream_open import StreamOpenError, open_stream

ECHO = "/meshnode-test/echo/1"


async def _echo(stream: INetStream) -> None:
    data = await stream.read(100)
    await stream.write(data)
    await stream.close()


async def test_a_stream_for_one_protocol_opens_in_one_go_and_carries_data() -> None:
    async with running_host(NodeIdentity.generate()) as server:
        server.set_stream_handler(TProtocol(ECHO), _echo)
        async with running_host(NodeIdentity.generate()) as client:
            info = parse_peer_addr(full_addrs(server)[0])
            await client.connect(info)
            ops: list[str] = []
            network = client.get_network()
            plain_new_stream = network.new_stream

            async def recording_new_stream(peer: ID) -> INetStream:
                stream = await plain_new_stream(peer)
                write, read = stream.write, stream.read

                async def rec_write(data: bytes) -> None:
                    ops.append(f"write {data!r}")
                    await write(data)

                async def rec_read(n: int | None = None) -> bytes:
                    ops.append("read")
                    return await read(n)

                stream.write, stream.read = rec_write, rec_read  # type: ignore[method-assign]
                return stream

            network.new_stream = recording_new_stream  # type: ignore[method-assign,assignment]
            stream = await open_stream(client, info.peer_id, ECHO, 5.0)
            assert stream.get_protocol() == ECHO
            # Header and proposal went out in one write, before any reply was read.
            assert ops[0].startswith("write") and "/multistream/1.0.0" in ops[0]
            assert ECHO in ops[0] and "read" in ops[1]
            await stream.write(b"ping")
            with trio.fail_after(5):
                assert await stream.read(100) == b"ping"


async def test_a_protocol_the_peer_does_not_serve_is_a_clear_error() -> None:
    async with running_host(NodeIdentity.generate()) as server:
        async with running_host(NodeIdentity.generate()) as client:
            info = parse_peer_addr(full_addrs(server)[0])
            await client.connect(info)
            with pytest.raises(StreamOpenError, match="does not serve"):
                await open_stream(client, info.peer_id, "/meshnode-test/absent/1", 5.0)
            # The connection is still good for a protocol it does serve.
            server.set_stream_handler(TProtocol(ECHO), _echo)
            stream = await open_stream(client, info.peer_id, ECHO, 5.0)
            await stream.write(b"x")
            with trio.fail_after(5):
                assert await stream.read(10) == b"x"
