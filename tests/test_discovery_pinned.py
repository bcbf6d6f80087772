"""A client pinned to a provider with ``--peer`` and no bootstrap keeps its advert fresh."""

from __future__ import annotations

import time

import pytest
import trio

import meshnode.node as node_module
from meshnode.engine.llama import LlamaEngine
from meshnode.identity import NodeIdentity
from meshnode.node import ProviderSettings, client_node, provider_node
from meshnode.p2p.host import full_addrs

pytestmark = pytest.mark.slow

# Stands in for the provider's 300 s: long enough for a round trip, short enough that
# the test sees the first advert expire.
SHORT_LIFETIME_S = 4.0
WAIT_S = 20.0  # bound on every wait below


async def test_a_pinned_provider_is_still_usable_after_its_first_advert_expires(
    tiny_engine: LlamaEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_module, "ADVERT_LIFETIME_S", SHORT_LIFETIME_S)
    model = tiny_engine.info.model_id
    async with provider_node(tiny_engine, identity=NodeIdentity.generate(),
                             settings=ProviderSettings()) as provider:
        async with client_node(allow_insecure=True) as client:
            first = await client.connect(full_addrs(provider.host)[0])
            assert first.expires_at - first.issued_at == SHORT_LIFETIME_S
            with trio.fail_after(WAIT_S):  # past the first advert's expiry
                while time.time() < first.expires_at + 0.5:
                    await trio.sleep(0.1)
            listing = client.directory.get(provider.peer_id, time.time())
            assert listing is not None, "the pinned provider's advert expired unrefreshed"
            assert listing.advert.seq > first.seq and listing.verified
            with trio.fail_after(WAIT_S):
                result = await client.complete(model, "hello", max_tokens=4)
    assert result.providers == [provider.peer_id]
    assert client.dialer.refreshes >= 1
