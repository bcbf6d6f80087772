"""A provider that accepts no inbound connections is reached through the bootstrap relay."""

from __future__ import annotations

import time

import pytest
import trio
from discovery_mesh import MESH_WAIT_S, model_id, running_mesh
from libp2p.custom_types import TProtocol

from meshnode.p2p.advert_exchange import fetch_advert
from meshnode.p2p.relay import RelayClient, RelayError, circuit_addr, is_circuit_addr

pytestmark = pytest.mark.slow

ECHO = TProtocol("/meshnode-test/echo/1")


async def test_relayed_only_provider_is_reachable_through_the_relay() -> None:
    relayed = model_id("behind-nat")
    async with running_mesh([[model_id("open")], [relayed]], relayed=[1], republish_s=1.0) as mesh:
        hidden = mesh.providers[1]
        assert hidden.host.get_addrs() == []  # listens nowhere: the relay is the only way in

        async def echo(stream) -> None:  # type: ignore[no-untyped-def]
            await stream.write(b"echo:" + await stream.read(64))
            await stream.close()

        hidden.host.set_stream_handler(ECHO, echo)
        client = await mesh.add_client()
        with trio.fail_after(MESH_WAIT_S):
            while not (found := client.directory.providers_for(relayed, time.time())):
                await trio.sleep(0.05)
        addrs = found[0].advert.addrs
        assert addrs and all(is_circuit_addr(a) for a in addrs)

        dialer = RelayClient(client.host)
        async with dialer.running():
            peer = await dialer.dial(addrs[0])
            advert = await fetch_advert(client.host, peer)
            stream = await client.host.new_stream(peer, [ECHO])
            await stream.write(b"ping")
            with trio.fail_after(5):
                reply = await stream.read(64)
    assert advert.peer_id == hidden.peer_id == str(peer)
    assert reply == b"echo:ping"


async def test_dialing_a_peer_without_a_reservation_fails_with_a_clear_error() -> None:
    async with running_mesh([[model_id("open")]], gossip=False, dht=False) as mesh:
        client = await mesh.add_client(gossip=False)
        dialer = RelayClient(client.host)
        async with dialer.running():
            stranger = mesh.providers[0].peer_id  # reachable directly, but holds no slot
            with pytest.raises(RelayError, match="circuit"):
                await dialer.dial(circuit_addr(mesh.bootstrap_addr, stranger))


def test_circuit_addr_rejects_an_undialable_relay_address() -> None:
    with pytest.raises(ValueError, match="not a dialable peer address"):
        circuit_addr("/ip4/127.0.0.1/tcp/1", "12D3KooWHkKxh63BPz3caVs77Edh7GEh4ahZkoFcXEYZHDMH1M7M")
