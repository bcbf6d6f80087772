"""`/meshnode/directory/1`: a joining client asks a bootstrap node for the adverts it
holds, so its first usable advert arrives in one round trip instead of at the providers'
next gossip publish (up to a minute) — and relay-only providers, which cannot publish
DHT provider records, are found at once too. Every advert is re-verified by the
receiver; the bootstrap node is trusted for nothing but availability.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from meshnode.core.advert import MAX_ADVERT_BYTES
from meshnode.core.directory import Directory
from meshnode.core.messages import SchemaError
from meshnode.p2p.framed import FramedStream, StreamClosed

DIRECTORY_PROTOCOL = "/meshnode/directory/1"
# Batches stay well under the 1 MiB frame limit even with adverts at their size cap.
BATCH_BYTES = 512 * 1024
# The directory's own default capacity: a snapshot never carries more than one directory.
MAX_SNAPSHOT_ADVERTS = 1024
# A snapshot of a full directory is a few MiB over loopback or a WAN link.
SNAPSHOT_TIMEOUT_S = 15.0


def _batches(adverts: list[bytes]) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    size = 0
    for data in adverts:
        if batch and size + len(data) > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(data)
        size += len(data)
    if batch:
        yield batch


async def serve_snapshot(stream: INetStream, directory: Directory) -> None:
    fs = FramedStream(stream)
    try:
        adverts = [lst.signed for lst in directory.peers(time.time()) if lst.signed]
        for batch in _batches(adverts[:MAX_SNAPSHOT_ADVERTS]):
            await fs.send_map({"t": "adverts", "items": batch})
    except StreamClosed:
        pass
    finally:
        await fs.close()


def install_snapshot_server(host: IHost, directory: Directory) -> None:
    async def handler(stream: INetStream) -> None:
        await serve_snapshot(stream, directory)

    host.set_stream_handler(TProtocol(DIRECTORY_PROTOCOL), handler)


async def fetch_snapshot(host: IHost, peer: ID) -> list[bytes]:
    """The signed adverts `peer` holds (unverified: insert them into a Directory)."""
    out: list[bytes] = []
    with trio.fail_after(SNAPSHOT_TIMEOUT_S):
        stream = await host.new_stream(peer, [TProtocol(DIRECTORY_PROTOCOL)])
        fs = FramedStream(stream)
        try:
            while len(out) < MAX_SNAPSHOT_ADVERTS:
                try:
                    frame = await fs.recv_map(SNAPSHOT_TIMEOUT_S)
                except StreamClosed:
                    break
                items = frame.get("items")
                if frame.get("t") != "adverts" or not isinstance(items, list):
                    raise SchemaError("expected an adverts frame")
                for item in items:
                    if not isinstance(item, bytes) or len(item) > MAX_ADVERT_BYTES:
                        raise SchemaError("advert entries must be bytes within the size limit")
                out.extend(items)
        finally:
            await fs.close()
    return out[:MAX_SNAPSHOT_ADVERTS]
