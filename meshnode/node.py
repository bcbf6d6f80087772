"""The trio shell that wires a node together for its role.

`ProviderNode` loads a model, opens a libp2p host, serves `/meshnode/job/1` and its
signed advert. `ClientNode` is a light peer: a host that dials providers and runs jobs.
Each owns one nursery; everything it starts lives and dies with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol

from meshnode.core.advert import Advert, Capacity, Load, ModelOffer, encode_signed
from meshnode.core.messages import JOB_PROTOCOL
from meshnode.core.peerid import peer_id_from_ed25519
from meshnode.engine.base import Engine
from meshnode.identity import NodeIdentity, load_or_create
from meshnode.jobs.client import JobRequest, JobResult, OnText, run_job
from meshnode.jobs.payment_gate import Payer
from meshnode.jobs.provider import GateFactory, JobProvider
from meshnode.p2p.advert_exchange import ADVERT_PROTOCOL, fetch_advert, serve_advert
from meshnode.p2p.host import (
    DEFAULT_LISTEN,
    DIAL_TIMEOUT_S,
    full_addrs,
    parse_peer_addr,
    running_host,
)

log = logging.getLogger(__name__)

# Adverts live 5 minutes and are re-signed at half-life, so a client holding one never
# sees it expire while the provider is up, and a dead provider drops out within minutes.
ADVERT_LIFETIME_S = 300.0


@dataclass
class ProviderSettings:
    listen: str = DEFAULT_LISTEN
    slots: int = 1
    max_queue: int = 4
    price_prompt_per_1k: int = 0
    price_completion_per_1k: int = 0
    attestation: dict[str, Any] = field(default_factory=lambda: {"kind": "dev"})


class ProviderNode:
    def __init__(
        self,
        host: IHost,
        identity: NodeIdentity,
        engine: Engine,
        settings: ProviderSettings,
        gate_factory: GateFactory | None = None,
    ) -> None:
        self.host = host
        self.identity = identity
        self.engine = engine
        self.settings = settings
        self.jobs = JobProvider(
            engine,
            identity.job_secret,
            slots=settings.slots,
            max_queue=settings.max_queue,
            gate_factory=gate_factory,
        )
        # Sequence numbers must rise across restarts too; milliseconds since the epoch do.
        self._seq = int(time.time() * 1000)
        self.tokens_per_s = 0.0

    @property
    def peer_id(self) -> str:
        return peer_id_from_ed25519(self.identity.peer_public)

    @property
    def addrs(self) -> list[str]:
        return full_addrs(self.host)

    def advert(self, now: float | None = None) -> Advert:
        now = time.time() if now is None else now
        self._seq = max(self._seq + 1, int(now * 1000))
        info = self.engine.info
        return Advert(
            peer_id=self.peer_id,
            peer_pubkey=self.identity.peer_public,
            addrs=tuple(self.addrs),
            models=(
                ModelOffer(
                    id=info.model_id,
                    name=info.name,
                    quant=info.quant,
                    ctx=info.n_ctx,
                    price_prompt_per_1k=self.settings.price_prompt_per_1k,
                    price_completion_per_1k=self.settings.price_completion_per_1k,
                ),
            ),
            capacity=Capacity(slots=self.settings.slots, tokens_per_s=self.tokens_per_s),
            load=Load(busy_slots=self.jobs.active, queue_len=self.jobs.queued),
            job_pubkey=self.identity.job_public,
            seq=self._seq,
            issued_at=now,
            expires_at=now + ADVERT_LIFETIME_S,
            attestation=self.settings.attestation,
        )

    def signed_advert(self) -> bytes:
        return encode_signed(self.advert(), self.identity.peer_seed)

    async def _serve_advert(self, stream: INetStream) -> None:
        await serve_advert(stream, self.signed_advert())

    def install(self) -> None:
        self.host.set_stream_handler(TProtocol(JOB_PROTOCOL), self.jobs.handle_stream)
        self.host.set_stream_handler(TProtocol(ADVERT_PROTOCOL), self._serve_advert)


@asynccontextmanager
async def provider_node(
    engine: Engine,
    *,
    identity: NodeIdentity | None = None,
    home: Path | None = None,
    settings: ProviderSettings | None = None,
    gate_factory: GateFactory | None = None,
) -> AsyncIterator[ProviderNode]:
    """Run a provider until the block exits. Identity comes from `home` unless given."""
    if identity is None:
        if home is None:
            raise ValueError("provider_node needs an identity or a home directory")
        identity, _ = load_or_create(home)
    settings = settings or ProviderSettings()
    async with running_host(identity, settings.listen) as host:
        node = ProviderNode(host, identity, engine, settings, gate_factory)
        node.install()
        yield node


class ClientNode:
    def __init__(self, host: IHost) -> None:
        self.host = host
        self.adverts: dict[str, Advert] = {}

    async def connect(self, addr: str) -> Advert:
        """Dial a provider by multiaddr and fetch its verified advert."""
        info = parse_peer_addr(addr)
        with trio.fail_after(DIAL_TIMEOUT_S):
            await self.host.connect(info)
        advert = await fetch_advert(self.host, info.peer_id)
        self.adverts[advert.peer_id] = advert
        return advert

    async def ask(
        self,
        advert: Advert,
        prompt: str,
        *,
        model: str | None = None,
        max_tokens: int = 128,
        params: dict[str, Any] | None = None,
        on_text: OnText | None = None,
        payer: Payer | None = None,
    ) -> JobResult:
        offer = advert.offer_for(model) if model else advert.models[0]
        if offer is None:
            raise LookupError(f"provider {advert.peer_id} does not serve {model!r}")
        from libp2p.peer.id import ID

        return await run_job(
            self.host,
            ID.from_base58(advert.peer_id),
            advert.job_pubkey,
            JobRequest(
                model_id=offer.id, prompt=prompt, max_tokens=max_tokens, params=params or {}
            ),
            on_text=on_text,
            payer=payer,
        )


@asynccontextmanager
async def client_node(
    *, identity: NodeIdentity | None = None, listen: str = DEFAULT_LISTEN
) -> AsyncIterator[ClientNode]:
    """A light client. Its identity is ephemeral by default: a client has no reputation
    to keep, and a fresh peer id per session is better for privacy."""
    async with running_host(identity or NodeIdentity.generate(), listen) as host:
        yield ClientNode(host)
