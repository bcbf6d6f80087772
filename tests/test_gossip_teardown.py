"""A node that stops while gossip still arrives stops cleanly (py-libp2p 0.8.1 race)."""

from __future__ import annotations

import pytest
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.pubsub.pubsub import Pubsub

from meshnode.identity import NodeIdentity
from meshnode.p2p.gossip import MeshPubsub, gossip_rate_limiter, make_router
from meshnode.p2p.host import full_addrs, parse_peer_addr, running_host

PROTO = "/meshnode-test/pubsub-stream/1"


async def _handled_by(pubsub: MeshPubsub, error: RuntimeError) -> BaseException | None:
    """Run the pubsub's stream handler on a real stream whose reader raises ``error``."""
    outcome: list[BaseException | None] = []

    async def raising_reader(self: Pubsub, stream: INetStream) -> None:
        raise error

    async def handler(stream: INetStream) -> None:
        try:
            await pubsub.stream_handler(stream)
            outcome.append(None)
        except RuntimeError as exc:
            outcome.append(exc)

    mp = pytest.MonkeyPatch()
    mp.setattr(Pubsub, "continuously_read_stream", raising_reader)
    try:
        async with running_host(NodeIdentity.generate()) as server:
            server.set_stream_handler(TProtocol(PROTO), handler)
            async with running_host(NodeIdentity.generate()) as client:
                info = parse_peer_addr(full_addrs(server)[0])
                await client.connect(info)
                await client.new_stream(info.peer_id, [TProtocol(PROTO)])
                with trio.fail_after(10):
                    while not outcome:
                        await trio.sleep(0.01)
    finally:
        mp.undo()
    return outcome[0]


async def test_a_pubsub_stream_ending_in_a_closing_nursery_does_not_fail_the_node() -> None:
    async with running_host(NodeIdentity.generate()) as host:
        pubsub = MeshPubsub(host, make_router(), gossip_rate_limiter(), lambda: None)
        closing = RuntimeError("Nursery is closed to new arrivals")
        assert await _handled_by(pubsub, closing) is None
        other = RuntimeError("something else")
        assert await _handled_by(pubsub, other) is other  # real bugs still surface
