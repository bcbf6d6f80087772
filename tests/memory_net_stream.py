"""A trio in-memory stream shaped like the libp2p stream FramedStream wraps, for driving
the job protocol's trio halves without sockets."""

from __future__ import annotations

import trio


class MemoryNetStream:
    """A trio stream with the four methods FramedStream uses of a libp2p stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def read(self, n: int) -> bytes:
        try:
            return bytes(await self._stream.receive_some(n))
        except trio.ClosedResourceError:
            return b""

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close(self) -> None:
        await self._stream.aclose()

    async def reset(self) -> None:
        await self._stream.aclose()
