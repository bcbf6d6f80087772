"""A libp2p stream speaking meshnode frames: read and write whole, validated messages."""

from __future__ import annotations

from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF, StreamError, StreamReset

from meshnode.core.messages import Message, parse_message
from meshnode.core.wire import FrameDecoder, WireError, encode_frame

# Reads ask libp2p for at most this much at a time so one read never allocates more
# than a yamux window regardless of what the peer announced. Each read takes whatever
# is buffered up to this (bytes past the current frame stay in the decoder: one
# FramedStream owns its stream's reads), so a frame costs one read, not one for its
# length prefix and another for its body (each read is ~0.1 ms of py-libp2p).
READ_CHUNK = 64 * 1024
# Writing one frame to a live peer takes milliseconds; a peer that stops reading for this
# long is gone or hostile and must not hold a generation slot.
WRITE_TIMEOUT_S = 30.0
# Closing is one small frame; a peer that cannot take it within a second is gone.
CLOSE_TIMEOUT_S = 1.0


class StreamClosed(Exception):
    """The peer closed or reset the stream."""


class FramedStream:
    def __init__(self, stream: INetStream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._pending: list[dict[str, Any]] = []
        self._send_lock = trio.Lock()

    async def recv(self, timeout: float) -> Message:
        """Next job-protocol message; raises WireError for bad frames, StreamClosed at end
        of stream, trio.TooSlowError when nothing complete arrives within `timeout`."""
        return parse_message(await self.recv_map(timeout))

    async def recv_map(self, timeout: float) -> dict[str, Any]:
        """Next frame as a decoded map, schema unchecked (for other protocols)."""
        with trio.fail_after(timeout):
            while not self._pending:
                try:
                    data = await self.stream.read(READ_CHUNK)
                except StreamEOF:
                    self._decoder.eof()
                    raise StreamClosed("peer closed the stream") from None
                except (StreamReset, StreamError) as exc:
                    raise StreamClosed(f"stream failed: {exc}") from exc
                if not data:
                    self._decoder.eof()
                    raise StreamClosed("peer closed the stream")
                self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)

    async def send(self, message: Message) -> None:
        await self.send_raw(encode_frame(message.to_wire()))

    async def send_many(self, messages: list[Message]) -> None:
        """Several messages in one write: one yamux frame, one Noise record, one TCP
        segment when they fit, so the peer gets them together (Open + sealed prompt)."""
        await self.send_raw(b"".join(encode_frame(m.to_wire()) for m in messages))

    async def send_map(self, frame: dict[str, Any]) -> None:
        await self.send_raw(encode_frame(frame))

    async def send_raw(self, data: bytes) -> None:
        async with self._send_lock:
            with trio.fail_after(WRITE_TIMEOUT_S):
                try:
                    await self.stream.write(data)
                except (StreamReset, StreamError) as exc:
                    raise StreamClosed(f"stream failed: {exc}") from exc

    async def close(self) -> None:
        # Shielded: a caller being cancelled is exactly when the peer must hear about it.
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self.stream.close()
            except Exception:  # closing a dead stream is not an error worth reporting
                pass

    async def reset(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await self.stream.reset()
            except Exception:  # resetting a dead stream is not an error worth reporting
                pass


__all__ = ["FramedStream", "StreamClosed", "WireError"]
