"""`/meshnode/advert/1`: ask a peer for its signed capability advert directly.

Discovery spreads adverts by gossip and the DHT; a client given only a multiaddr (or
one that wants the freshest load figures) asks the provider itself. The advert is
verified like any other, and it must belong to the peer the Noise session authenticated.
"""

from __future__ import annotations

import time

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from meshnode.core.advert import (
    MAX_ADVERT_BYTES,
    Advert,
    AdvertRejected,
    RejectReason,
    decode_and_verify,
)
from meshnode.core.messages import SchemaError
from meshnode.p2p.framed import FramedStream

ADVERT_PROTOCOL = "/meshnode/advert/1"
# One small frame over an open connection: a round trip and a signature check.
ADVERT_TIMEOUT_S = 10.0


async def serve_advert(stream: INetStream, signed: bytes) -> None:
    fs = FramedStream(stream)
    try:
        await fs.send_map({"t": "advert", "data": signed})
    finally:
        await fs.close()


async def fetch_advert(host: IHost, peer: ID, *, now: float | None = None) -> Advert:
    """The peer's verified advert (see fetch_signed_advert for the raw bytes)."""
    return decode_and_verify(await fetch_signed_advert(host, peer, now=now),
                             time.time() if now is None else now)


async def fetch_signed_advert(host: IHost, peer: ID, *, now: float | None = None) -> bytes:
    """The peer's signed advert bytes, checked to be valid and to be its own."""
    with trio.fail_after(ADVERT_TIMEOUT_S):
        stream = await host.new_stream(peer, [TProtocol(ADVERT_PROTOCOL)])
        fs = FramedStream(stream)
        try:
            frame = await fs.recv_map(ADVERT_TIMEOUT_S)
        finally:
            await fs.close()
    data = frame.get("data")
    if frame.get("t") != "advert" or not isinstance(data, bytes) or len(data) > MAX_ADVERT_BYTES:
        raise SchemaError("expected one advert frame")
    advert = decode_and_verify(data, time.time() if now is None else now)
    if advert.peer_id != str(peer):
        raise AdvertRejected(
            RejectReason.PEER_ID_MISMATCH,
            f"peer {peer} answered with the advert of {advert.peer_id}",
        )
    return data
