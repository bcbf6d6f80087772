"""A small mesh on 127.0.0.1 for discovery tests and benches: one bootstrap node, some
providers with made-up models (no llama.cpp: discovery only reads their adverts) and
light clients that know nothing but the bootstrap address."""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from meshnode.core.advert import Advert, Capacity, Load, ModelOffer, encode_signed
from meshnode.core.directory import Directory
from meshnode.core.peerid import peer_id_from_ed25519
from meshnode.identity import NodeIdentity
from meshnode.p2p.advert_exchange import ADVERT_PROTOCOL, serve_advert
from meshnode.p2p.discovery import BootstrapNode, ClientDiscovery, OnInsert, ProviderAnnouncer
from meshnode.p2p.host import full_addrs, make_host, running_host

ADVERT_LIFETIME_S = 300.0  # as a real provider: re-signed often, lives minutes
# Tests wait at most this long for something the mesh should do in about a second.
MESH_WAIT_S = 20.0


def model_id(name: str) -> str:
    """A made-up model id (the sha256 a real GGUF file would have)."""
    return hashlib.sha256(name.encode()).hexdigest()


@dataclass
class FakeProvider:
    """A provider without an engine: a host, an identity and the models it claims."""

    host: IHost
    identity: NodeIdentity
    models: tuple[str, ...]
    announcer: ProviderAnnouncer | None = None
    published: list[int] = field(default_factory=list)  # seqs handed to the announcer
    _seq: int = 0

    @property
    def peer_id(self) -> str:
        return peer_id_from_ed25519(self.identity.peer_public)

    def advert(self) -> Advert:
        now = time.time()
        self._seq = max(self._seq + 1, int(now * 1000))
        circuits = self.announcer.circuit_addrs if self.announcer else []
        return Advert(
            peer_id=self.peer_id,
            peer_pubkey=self.identity.peer_public,
            addrs=tuple(full_addrs(self.host) + circuits),
            models=tuple(
                ModelOffer(
                    id=m,
                    name=f"model-{m[:8]}",
                    quant="Q4_K_M",
                    ctx=4096,
                    price_prompt_per_1k=1,
                    price_completion_per_1k=2,
                )
                for m in self.models
            ),
            capacity=Capacity(slots=1, tokens_per_s=50.0),
            load=Load(busy_slots=0, queue_len=0),
            job_pubkey=self.identity.job_public,
            seq=self._seq,
            issued_at=now,
            expires_at=now + ADVERT_LIFETIME_S,
            attestation={"kind": "dev"},
        )

    def signed_advert(self) -> bytes:
        data = encode_signed(self.advert(), self.identity.peer_seed)
        self.published.append(self._seq)
        return data

    async def _serve_advert(self, stream: INetStream) -> None:
        await serve_advert(stream, self.signed_advert())


async def _open_node(
    stack: AsyncExitStack, host_cm: AbstractAsyncContextManager[IHost]
) -> tuple[IHost, trio.Nursery]:
    """A host and a nursery for its services, both closed by ``stack``: the services are
    cancelled first, then the host closes (each node nests its own nursery in its host,
    so trio's nursery nesting holds however many nodes a test starts)."""
    host = await stack.enter_async_context(host_cm)
    nursery = await stack.enter_async_context(trio.open_nursery())
    stack.callback(nursery.cancel_scope.cancel)
    return host, nursery


@dataclass
class Mesh:
    bootstrap: BootstrapNode
    bootstrap_addr: str
    providers: list[FakeProvider]
    stack: AsyncExitStack

    async def add_client(
        self, *, gossip: bool = True, on_insert: OnInsert | None = None
    ) -> ClientDiscovery:
        host, nursery = await _open_node(self.stack, running_host(NodeIdentity.generate()))
        client = ClientDiscovery(
            host, Directory(), [self.bootstrap_addr], gossip=gossip, on_insert=on_insert
        )
        await nursery.start(client.run)
        return client


@asynccontextmanager
async def _unlisted_host(identity: NodeIdentity) -> AsyncIterator[IHost]:
    """A host with no listen address at all: it can dial out, nobody can dial in."""
    host = make_host(identity)
    async with host.run(listen_addrs=[]):
        try:
            yield host
        finally:
            await host.close()


@asynccontextmanager
async def running_mesh(
    provider_models: Sequence[Sequence[str]],
    *,
    gossip: bool = True,
    dht: bool = True,
    relayed: Sequence[int] = (),
    republish_s: float = 60.0,
    load_interval_s: float = 0.0,
) -> AsyncIterator[Mesh]:
    """Bootstrap + one provider per entry of ``provider_models``; providers whose index
    is in ``relayed`` listen nowhere and are reachable only through the bootstrap relay."""
    async with AsyncExitStack() as stack:
        boot_host, nursery = await _open_node(stack, running_host(NodeIdentity.generate()))
        bootstrap = BootstrapNode(boot_host)
        await nursery.start(bootstrap.run)
        boot_addr = full_addrs(boot_host)[0]
        providers = []
        for i, models in enumerate(provider_models):
            identity = NodeIdentity.generate()
            relay_only = i in relayed
            host, nursery = await _open_node(
                stack, _unlisted_host(identity) if relay_only else running_host(identity)
            )
            fake = FakeProvider(host=host, identity=identity, models=tuple(models))
            host.set_stream_handler(TProtocol(ADVERT_PROTOCOL), fake._serve_advert)
            fake.announcer = ProviderAnnouncer(
                host,
                fake.signed_advert,
                list(models),
                [boot_addr],
                gossip=gossip,
                dht=dht,
                relay_addrs=[boot_addr] if relay_only else (),
                republish_s=republish_s,
                load_publish_min_interval_s=load_interval_s,
            )
            await nursery.start(fake.announcer.run)
            providers.append(fake)
        yield Mesh(bootstrap, boot_addr, providers, stack)
