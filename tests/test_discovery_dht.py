"""Cold-start discovery through the Kademlia DHT alone (gossip off everywhere)."""

from __future__ import annotations

import time

import pytest
import trio
from discovery_mesh import FakeProvider, model_id, running_mesh
from libp2p.peer.id import ID

from meshnode.core.advert import encode_signed
from meshnode.identity import NodeIdentity
from meshnode.p2p.dht import AdvertRecordValidator, advert_key, provider_key

pytestmark = pytest.mark.slow


async def test_client_finds_the_one_provider_of_a_model_via_dht_alone() -> None:
    models = [[model_id(f"solo-{i}")] for i in range(5)]
    async with running_mesh(models, gossip=False) as mesh:
        client = await mesh.add_client(gossip=False)
        found = await client.find(model_id("solo-3"), timeout=20)
    assert [p.peer_id for p in found] == [mesh.providers[3].peer_id]
    assert client.dht_lookups == 1


async def test_two_providers_of_one_model_are_both_found() -> None:
    shared = model_id("shared")
    models = [[shared], [model_id("other-1")], [shared, model_id("other-2")]]
    async with running_mesh(models, gossip=False) as mesh:
        client = await mesh.add_client(gossip=False)
        found = await client.find(shared, timeout=20)
    assert sorted(p.peer_id for p in found) == sorted(
        [mesh.providers[0].peer_id, mesh.providers[2].peer_id]
    )


async def test_a_model_nobody_serves_finds_nothing() -> None:
    async with running_mesh([[model_id("present")]], gossip=False) as mesh:
        client = await mesh.add_client(gossip=False)
        assert await client.find(model_id("absent"), timeout=20) == []


async def test_find_asks_the_dht_when_the_directory_holds_no_verified_provider() -> None:
    """A stranger's advert for the model (never verified) must not hide the real
    provider: the client still looks the model up in the DHT."""
    wanted = model_id("hidden")
    async with running_mesh([[wanted]], gossip=False) as mesh:
        client = await mesh.add_client(gossip=False)
        stranger = FakeProvider(_FakeHost(), NodeIdentity.generate(), (wanted,))  # type: ignore[arg-type]
        assert client.directory.insert(stranger.signed_advert(), time.time()).accepted
        found = await client.find(wanted, timeout=20)
    assert mesh.providers[0].peer_id in {p.peer_id for p in found}
    assert client.dht_lookups == 1


async def test_light_client_is_never_listed_as_a_dht_server() -> None:
    async with running_mesh([[model_id("a")], [model_id("b")]], gossip=False) as mesh:
        client = await mesh.add_client(gossip=False)
        await client.find(model_id("a"), timeout=20)  # the client has queried servers
        client_id = client.host.get_id()
        tables = [mesh.bootstrap.dht] + [p.announcer.dht for p in mesh.providers]  # type: ignore[union-attr]
        # Identify answers within moments; the prune loop then drops any client entry.
        with trio.fail_after(15):
            while any(t is not None and t.routing_table.peer_in_table(client_id) for t in tables):
                for t in tables:
                    assert t is not None
                    t.prune_non_servers()
                await trio.sleep(0.1)
        assert all(t is not None and t.get_routing_table_size() > 0 for t in tables)


def test_advert_records_are_keyed_by_the_hash_of_their_own_peer_id() -> None:
    identity = NodeIdentity.generate()
    key = advert_key(FakeProvider(None, identity, (model_id("x"),)).peer_id)  # type: ignore[arg-type]
    assert key.startswith("/meshnode-advert/") and len(key.encode()) <= 50
    assert len(bytes.fromhex(provider_key(model_id("x")))) == 34  # sha2-256 multihash


def _signed(identity: NodeIdentity, seq_bump: int = 0) -> tuple[str, bytes]:
    fake = FakeProvider(_FakeHost(), identity, (model_id("x"),))  # type: ignore[arg-type]
    fake._seq = int(time.time() * 1000) + seq_bump
    advert = fake.advert()
    return advert.peer_id, encode_signed(advert, identity.peer_seed)


class _FakeHost:
    """Just enough of a host for ``full_addrs``: no addresses, a peer id."""

    def get_addrs(self) -> list[object]:
        return []

    def get_id(self) -> ID:
        return ID(b"\x00")


def test_validator_accepts_a_peers_own_advert_under_its_key() -> None:
    peer, data = _signed(NodeIdentity.generate())
    AdvertRecordValidator().validate(advert_key(peer), data)


def test_validator_refuses_an_advert_stored_under_another_peers_key() -> None:
    _, data = _signed(NodeIdentity.generate())
    other, _ = _signed(NodeIdentity.generate())
    with pytest.raises(ValueError, match="foreign key"):
        AdvertRecordValidator().validate(advert_key(other), data)


def test_validator_refuses_garbage_and_expired_adverts() -> None:
    peer, data = _signed(NodeIdentity.generate())
    with pytest.raises(ValueError, match="malformed"):
        AdvertRecordValidator().validate(advert_key(peer), b"\x93junk")
    later = AdvertRecordValidator(clock=lambda: time.time() + 3600)
    with pytest.raises(ValueError, match="expired"):
        later.validate(advert_key(peer), data)


def test_validator_selects_the_highest_seq() -> None:
    identity = NodeIdentity.generate()
    peer, old = _signed(identity)
    _, new = _signed(identity, seq_bump=10)
    assert AdvertRecordValidator().select(advert_key(peer), [old, b"junk", new]) == 2
