"""Yamux with its receive window enforced: a peer cannot make us buffer more than we granted.

Why this module exists: py-libp2p 0.8.1's ``Yamux.handle_incoming`` appends every DATA
frame to the stream's buffer and, when the peer has sent more than the receive window,
only logs "peer exceeded receive window" and carries on. A stream the node has stopped
reading (a job stream after ``Open``, a handler that does not read) then grows by every
byte a stranger pushes: +1.5 GiB RSS for 1.5 GiB sent was measured on a live node.

What this module does, and nothing else: ``install()`` caps the auto-tuned window at
``MAX_STREAM_WINDOW`` (py-libp2p's module constant ``MAX_WINDOW_SIZE``, also its largest
accepted DATA frame; py-libp2p and go-yamux send 64 KiB frames) and makes py-libp2p build
``WindowedYamux`` connections (its muxer negotiation instantiates the name ``Yamux`` from
``libp2p.stream_muxer.muxer_multistream`` whatever muxer class a host was given, so that
name is rebound there; it affects every host in the process). ``WindowedYamux`` is a ``Yamux`` whose
``stream_buffers`` map hands out ``_StreamBuffer`` objects. ``Yamux`` appends received
DATA with ``stream_buffers[id].extend(data)`` *before* it subtracts the frame from
``recv_window``; our ``extend`` checks the frame against the window still granted and,
when the peer overruns it, drops the frame, empties the buffer and resets the stream
(RST). A connection whose peer overruns windows ``MAX_WINDOW_VIOLATIONS`` times, or whose
streams together hold more than ``MAX_BUFFERED_PER_CONNECTION`` unread bytes, is closed.

The receive side of a well-behaved peer is untouched: py-libp2p raises ``recv_window``
before it sends the WINDOW_UPDATE that lets the peer send more, so a peer that respects
the window never trips the check.

The internals relied on are checked at import time against the pinned py-libp2p version
(``check_compatible``); an upgrade fails loudly here instead of silently losing the
bound. Remove this module once py-libp2p enforces the window itself.
"""

from __future__ import annotations

import inspect
import logging
from importlib.metadata import version
from typing import Any

from libp2p.stream_muxer import muxer_multistream
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import Yamux

log = logging.getLogger(__name__)

# The py-libp2p release whose Yamux internals this module was written against.
PINNED_LIBP2P_VERSION = "0.8.1"
# Window overruns tolerated per connection before it is closed: one may be a bug in a
# peer's flow control, a few in a row is a peer pushing bytes on purpose.
MAX_WINDOW_VIOLATIONS = 3
# Largest receive window one stream may grow to. py-libp2p auto-tunes windows up to 16 MiB
# and reached 4 MiB on a stream that had only read three protocol-negotiation messages, so
# an unread stream could hold 4-16 MiB. meshnode's largest message is a 1 MiB frame; 2 MiB
# keeps one frame in flight plus slack, and still allows 20 MB/s per stream at 100 ms RTT.
MAX_STREAM_WINDOW = 2 * 1024 * 1024
# Unread bytes all streams of one connection may hold together: four full windows (job,
# DHT, gossip and identify streams each lagging at once); beyond that the peer is pushing.
MAX_BUFFERED_PER_CONNECTION = 4 * MAX_STREAM_WINDOW


class Libp2pYamuxCompatError(RuntimeError):
    """The installed py-libp2p's yamux no longer matches what this module relies on."""


def install() -> None:
    """Make every yamux connection py-libp2p negotiates from now on a ``WindowedYamux``."""
    check_compatible()
    muxer_multistream.Yamux = WindowedYamux  # type: ignore[attr-defined]
    yamux_module.MAX_WINDOW_SIZE = MAX_STREAM_WINDOW


def check_compatible() -> None:
    """Fail loudly if py-libp2p changed under us (see the module docstring)."""
    installed = version("libp2p")
    if installed != PINNED_LIBP2P_VERSION:
        raise Libp2pYamuxCompatError(
            f"meshnode.p2p.yamux_guard was written for py-libp2p {PINNED_LIBP2P_VERSION}, "
            f"found {installed}: check whether yamux now enforces its receive window, "
            "then update or remove this module"
        )
    source = inspect.getsource(Yamux.handle_incoming)
    if ".stream_buffers[stream_id].extend(" not in source or "recv_window -=" not in source:
        raise Libp2pYamuxCompatError(
            "Yamux.handle_incoming no longer appends DATA via stream_buffers[...].extend "
            "before updating recv_window: update meshnode.p2p.yamux_guard"
        )
    if "Yamux(" not in inspect.getsource(muxer_multistream.MuxerMultistream.new_conn):
        raise Libp2pYamuxCompatError(
            "MuxerMultistream.new_conn no longer builds Yamux by name: "
            "update meshnode.p2p.yamux_guard.install"
        )
    if getattr(muxer_multistream, "Yamux", None) not in (Yamux, WindowedYamux):
        raise Libp2pYamuxCompatError("muxer_multistream.Yamux is not py-libp2p's Yamux")
    autotune = inspect.getsource(yamux_module.YamuxStream._apply_autotune_epoch)
    if "MAX_WINDOW_SIZE" not in autotune:
        raise Libp2pYamuxCompatError(
            "YamuxStream auto-tuning no longer reads MAX_WINDOW_SIZE: "
            "update meshnode.p2p.yamux_guard.MAX_STREAM_WINDOW"
        )
    if not inspect.iscoroutinefunction(getattr(Yamux, "_cleanup_on_error", None)):
        raise Libp2pYamuxCompatError("Yamux._cleanup_on_error is gone: update yamux_guard")
    init = inspect.getsource(Yamux.__init__)
    if "self.stream_buffers" not in init or "self._nursery" not in init:
        raise Libp2pYamuxCompatError(
            "Yamux.__init__ no longer sets stream_buffers and _nursery: "
            "update meshnode.p2p.yamux_guard"
        )


class _StreamBuffer(bytearray):
    """The receive buffer of one yamux stream; refuses data beyond the granted window."""

    def __init__(self, conn: WindowedYamux, stream_id: int, initial: bytes = b"") -> None:
        super().__init__(initial)
        self._conn = conn
        self._stream_id = stream_id

    def extend(self, data: Any) -> None:
        size = len(data)
        stream = self._conn.streams.get(self._stream_id)
        if stream is not None and size > stream.recv_window:
            self._conn.window_overrun(self._stream_id, size - stream.recv_window)
            self.clear()
            return
        super().extend(data)
        if self._conn.buffered_bytes() > MAX_BUFFERED_PER_CONNECTION:
            self._conn.too_much_buffered()


class _StreamBuffers(dict[int, bytearray]):
    """``Yamux.stream_buffers`` whose values are window-checking ``_StreamBuffer``s."""

    def __init__(self, conn: WindowedYamux) -> None:
        super().__init__()
        self._conn = conn

    def __setitem__(self, stream_id: int, value: bytearray) -> None:
        if not isinstance(value, _StreamBuffer):
            value = _StreamBuffer(self._conn, stream_id, bytes(value))
        super().__setitem__(stream_id, value)


class WindowedYamux(Yamux):
    """A py-libp2p ``Yamux`` connection that resets streams overrunning their window."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream_buffers = _StreamBuffers(self)
        self.window_violations = 0
        self._closing_for_abuse = False

    def buffered_bytes(self) -> int:
        return sum(len(buffer) for buffer in self.stream_buffers.values())

    def window_overrun(self, stream_id: int, excess: int) -> None:
        """Called from inside ``handle_incoming`` (``streams_lock`` held): drop, reset."""
        self.window_violations += 1
        log.warning(
            "peer %s sent %d bytes beyond the receive window on yamux stream %d: "
            "resetting the stream (%d/%d overruns on this connection)",
            str(self.peer_id)[:64],
            excess,
            stream_id,
            self.window_violations,
            MAX_WINDOW_VIOLATIONS,
        )
        if self.window_violations >= MAX_WINDOW_VIOLATIONS:
            self._close_for_abuse()
            return
        stream = self.streams.get(stream_id)
        if stream is not None and self._nursery is not None:
            self._nursery.start_soon(stream.reset)

    def too_much_buffered(self) -> None:
        log.warning(
            "peer %s left more than %d unread bytes on one connection: closing it",
            str(self.peer_id)[:64],
            MAX_BUFFERED_PER_CONNECTION,
        )
        for buffer in self.stream_buffers.values():
            buffer.clear()
        self._close_for_abuse()

    def _close_for_abuse(self) -> None:
        if self._closing_for_abuse or self._nursery is None:
            return
        self._closing_for_abuse = True
        for buffer in self.stream_buffers.values():
            buffer.clear()
        # py-libp2p's own path for a protocol violation (an oversized frame): mark the
        # connection as shutting down and close it under handle_incoming's feet, whose
        # next read fails and runs the same cleanup.
        self.event_shutting_down.set()
        self._nursery.start_soon(self._cleanup_on_error)
