"""Cold start: a joining client gets the bootstrap node's adverts in one round trip."""

from __future__ import annotations

import dataclasses
import os
import time

from test_advert import make_advert

from meshnode.core.advert import encode_signed
from meshnode.core.directory import Directory
from meshnode.identity import NodeIdentity
from meshnode.p2p.directory_sync import fetch_snapshot, install_snapshot_server
from meshnode.p2p.host import full_addrs, parse_peer_addr, running_host


def _signed(now: float) -> bytes:
    seed = os.urandom(32)
    advert = make_advert(seed, issued_at=now, expires_at=now + 300)
    return encode_signed(dataclasses.replace(advert), seed)


async def test_snapshot_carries_every_advert_the_server_holds() -> None:
    now = time.time()
    served = Directory()
    adverts = [_signed(now) for _ in range(40)]
    for data in adverts:
        assert served.insert(data, now).accepted
    async with running_host(NodeIdentity.generate()) as server:
        install_snapshot_server(server, served)
        async with running_host(NodeIdentity.generate()) as client:
            info = parse_peer_addr(full_addrs(server)[0])
            await client.connect(info)
            got = await fetch_snapshot(client, info.peer_id)
    assert sorted(got) == sorted(adverts)
    fresh = Directory()
    assert all(fresh.insert(data, now).accepted for data in got)
