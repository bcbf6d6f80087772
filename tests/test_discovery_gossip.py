"""Adverts spread by gossipsub on `/meshnode/adverts/1`: delivery, and junk handling."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import trio
from discovery_mesh import MESH_WAIT_S, model_id, running_mesh
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from meshnode.core.directory import RATE_BURST, InsertResult
from meshnode.identity import NodeIdentity
from meshnode.p2p.discovery import ClientDiscovery
from meshnode.p2p.gossip import ADVERT_TOPIC
from meshnode.p2p.host import parse_peer_addr, running_host

pytestmark = pytest.mark.slow


def _now() -> float:
    return time.time()


async def _wait_for(client: ClientDiscovery, model: str) -> None:
    with trio.fail_after(MESH_WAIT_S):
        while not client.directory.providers_for(model, _now()):
            await trio.sleep(0.05)


async def test_client_finds_the_one_provider_of_a_model_via_gossip() -> None:
    models = [[model_id(f"g-{i}")] for i in range(5)]
    async with running_mesh(models, dht=False, republish_s=1.0) as mesh:
        client = await mesh.add_client()
        await _wait_for(client, model_id("g-2"))
        found = client.directory.providers_for(model_id("g-2"), _now())
    assert [p.peer_id for p in found] == [mesh.providers[2].peer_id]
    assert client.dht_lookups == 0  # the directory was filled by gossip alone


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds; fail after MESH_WAIT_S naming ``what``."""
    with trio.fail_after(MESH_WAIT_S):
        while not condition():
            await trio.sleep(0.05)
    assert condition(), what


async def test_every_advert_published_arrives() -> None:
    """Five providers each publish three load-change adverts, one after another as soon
    as the previous one is out; the client accepts every one of them. Three changes plus
    the first advert stay inside a receiver's burst of RATE_BURST, with a token to spare,
    so the test does not depend on how fast the machine refills buckets."""
    rounds = 3
    assert 1 + rounds < RATE_BURST
    models = [[model_id(f"rate-{i}")] for i in range(5)]
    async with running_mesh(models, dht=False, republish_s=3600.0, load_interval_s=0.2) as mesh:
        accepted: set[tuple[str, int]] = set()

        def record(result: InsertResult) -> None:
            if result.listing is not None:
                accepted.add((result.listing.peer_id, result.listing.advert.seq))

        client = await mesh.add_client(on_insert=record)
        boot = mesh.bootstrap.gossip
        assert client.gossip is not None and boot is not None
        client_id, boot_id = client.host.get_id(), mesh.bootstrap.host.get_id()
        gossips = [p.announcer.gossip for p in mesh.providers if p.announcer is not None]
        assert len(gossips) == len(mesh.providers) and all(g is not None for g in gossips)
        # The path provider -> bootstrap -> client exists once both meshes hold it.
        await _until(lambda: client_id in boot.mesh_peers(), "client in the bootstrap mesh")
        await _until(
            lambda: all(g is not None and boot_id in g.mesh_peers() for g in gossips),
            "bootstrap in every provider's mesh",
        )
        await _until(lambda: all(p.published for p in mesh.providers), "first adverts out")
        before = {p.peer_id: len(p.published) for p in mesh.providers}
        for n in range(1, rounds + 1):
            for p in mesh.providers:
                assert p.announcer is not None
                p.announcer.load_changed()
            # Each change is published before the next one is made: none coalesce.
            await _until(
                lambda n=n: all(len(p.published) - before[p.peer_id] >= n  # type: ignore[misc]
                                for p in mesh.providers),
                f"round {n} published",
            )
        published = {p.peer_id: p.published[before[p.peer_id]:] for p in mesh.providers}
        wanted = {(pid, seq) for pid, seqs in published.items() for seq in seqs}
        await _until(lambda: wanted <= accepted, "every published advert accepted")
    assert all(len(seqs) == rounds for seqs in published.values())
    assert client.directory.counters()["rate_limited"] == 0


async def test_junk_on_the_topic_is_counted_and_dropped_without_harm() -> None:
    async with running_mesh([[model_id("real")]], dht=False, republish_s=1.0) as mesh:
        client = await mesh.add_client()
        assert client.gossip is not None
        # A rogue peer with a bare gossipsub (no advert validator) next to the client.
        async with running_host(NodeIdentity.generate()) as rogue:
            router = GossipSub([PROTOCOL_ID_V11], 6, 4, 12, heartbeat_interval=1)
            pubsub = Pubsub(rogue, router)
            async with background_trio_service(pubsub), background_trio_service(router):
                await pubsub.wait_until_ready()
                await pubsub.subscribe(ADVERT_TOPIC)
                client_addr = f"{client.host.get_addrs()[0]}"
                await rogue.connect(parse_peer_addr(client_addr))
                with trio.fail_after(MESH_WAIT_S):
                    while client.gossip.rejected["malformed"] < 3:
                        await pubsub.publish(ADVERT_TOPIC, b"\x93not an advert")
                        await trio.sleep(0.3)
        await _wait_for(client, model_id("real"))
    assert client.directory.rejections.total() == 0  # junk never reached the directory
