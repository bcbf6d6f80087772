"""The trio shell that wires a node together for its role.

`ProviderNode` loads a model, opens a libp2p host, serves `/meshnode/job/1` and its
signed advert. `ClientNode` is a light peer: a host that dials providers and runs jobs.
Each owns one nursery; everything it starts lives and dies with it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from meshnode.client.dialer import Dialer
from meshnode.client.peer_stats import PeerStatsFile
from meshnode.client.verified import VerifiedDirectory
from meshnode.core.advert import Advert, Capacity, Load, ModelOffer, TonPayee, encode_signed
from meshnode.core.attest_binding import EPOCH_SECONDS, epoch_at
from meshnode.core.attest_policy import Reason
from meshnode.core.directory import Directory, InsertResult, Verification
from meshnode.core.messages import JOB_PROTOCOL
from meshnode.core.peerid import peer_id_from_ed25519
from meshnode.core.router import Router, Strategy
from meshnode.identity import NodeIdentity, load_or_create
from meshnode.jobs.client import JobError, JobRequest, JobResult, OnText, run_job
from meshnode.jobs.client_stats import ClientStats
from meshnode.jobs.job_streams import JobStreams
from meshnode.jobs.payment_gate import JobPayments, Payer, PaymentService, PayNothing
from meshnode.jobs.routed import DEFAULT_DEADLINE_S, NoProvider, RoutedJobs, RoutedResult
from meshnode.p2p.advert_exchange import ADVERT_PROTOCOL, serve_advert
from meshnode.p2p.discovery import ClientDiscovery, ProviderAnnouncer
from meshnode.p2p.host import (
    DEFAULT_LISTEN,
    full_addrs,
    running_host,
)
from meshnode.p2p.relay import RelayClient
from meshnode.tasks import background_tasks, node_context

if TYPE_CHECKING:
    # Provider-only parts: imported where a provider starts, so that a light client (every
    # `meshnode ask`) does not pay for the engine, the job server and TON payments.
    from meshnode.attest.evidence import Evidence, EvidenceProducer
    from meshnode.engine.base import Engine
    from meshnode.jobs.provider import GateFactory
    from meshnode.pay.setup.wiring import ProviderPayments

log = logging.getLogger(__name__)

# Adverts live 5 minutes and a fresh one is signed for every publish (each minute, and on
# load changes), so a live provider never lapses and a dead one drops out within minutes.
ADVERT_LIFETIME_S = 300.0


@dataclass
class ProviderSettings:
    listen: str | None = DEFAULT_LISTEN  # None: no inbound address (use `relay`)
    slots: int = 1
    max_queue: int = 4
    price_prompt_per_1k: int = 0
    price_completion_per_1k: int = 0
    tee: str = "dev"  # "dev" (no TEE, clients must opt in) or "tdx" (configfs-tsm quote)
    tokens_per_s_hint: float = 0.0  # advertised until the first job measures real speed
    ton: TonPayee | None = None  # channel key + wallet clients open payment channels to
    bootstrap: tuple[str, ...] = ()  # multiaddrs to join the mesh through (DHT + gossip)
    relay: tuple[str, ...] = ()  # relays to reserve a slot on when not directly reachable


class ProviderNode:
    def __init__(
        self,
        host: IHost,
        identity: NodeIdentity,
        engine: Engine,
        settings: ProviderSettings,
        gate_factory: GateFactory | None = None,
    ) -> None:
        from meshnode.attest.dev import DevEvidenceProducer
        from meshnode.attest.tdx_tsm import TdxEvidenceProducer
        from meshnode.jobs.provider import JobProvider

        self.host = host
        self.identity = identity
        self.engine = engine
        self.settings = settings
        self.jobs = JobProvider(
            engine,
            identity.job_secret,
            peer_id=peer_id_from_ed25519(identity.peer_public),
            slots=settings.slots,
            max_queue=settings.max_queue,
            gate_factory=gate_factory,
        )
        # Sequence numbers must rise across restarts too; milliseconds since the epoch do.
        self._seq = int(time.time() * 1000)
        self.evidence: Evidence | None = None
        self.producer: EvidenceProducer = (
            TdxEvidenceProducer() if settings.tee == "tdx"
            else DevEvidenceProducer(identity.signing_key)
        )
        self.announcer: ProviderAnnouncer | None = None

    async def refresh_evidence(self, now: float | None = None) -> None:
        """Fresh evidence binding our keys for the current epoch."""
        from meshnode.attest.local import make_evidence

        self.evidence = await make_evidence(
            self.producer,
            self.identity.job_public,
            self.identity.peer_public,
            time.time() if now is None else now,
        )

    async def keep_evidence_fresh(self) -> None:
        """Re-attest when the epoch turns, so clients never see a stale binding."""
        while True:
            now = time.time()
            next_epoch = (epoch_at(now) + 1) * EPOCH_SECONDS
            await trio.sleep(max(1.0, next_epoch - now))
            await self.refresh_evidence()
            if self.announcer is not None:
                self.announcer.load_changed()  # spread the new evidence now, not in a minute

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
            addrs=tuple(self.addrs + (self.announcer.circuit_addrs if self.announcer else [])),
            models=(
                ModelOffer(
                    id=info.model_id,
                    name=info.name,
                    quant=info.quant,
                    ctx=info.n_ctx,
                    price_prompt_per_1k=self.settings.price_prompt_per_1k,
                    price_completion_per_1k=self.settings.price_completion_per_1k,
                    chat_format=info.chat_format,
                    available=self.engine.available,
                ),
            ),
            capacity=Capacity(
                slots=self.settings.slots,
                tokens_per_s=self.jobs.stats.tokens_per_s or self.settings.tokens_per_s_hint,
            ),
            load=Load(busy_slots=self.jobs.active, queue_len=self.jobs.queued),
            job_pubkey=self.identity.job_public,
            seq=self._seq,
            issued_at=now,
            expires_at=now + ADVERT_LIFETIME_S,
            attestation=self.evidence.to_dict() if self.evidence is not None else b"",
            ton=self.settings.ton,
        )

    def signed_advert(self) -> bytes:
        return encode_signed(self.advert(), self.identity.peer_seed)

    async def _serve_advert(self, stream: INetStream) -> None:
        await serve_advert(stream, self.signed_advert())

    def install(self) -> None:
        self.host.set_stream_handler(TProtocol(JOB_PROTOCOL), self.jobs.handle_stream)
        self.host.set_stream_handler(TProtocol(ADVERT_PROTOCOL), self._serve_advert)


@node_context
async def provider_node(
    engine: Engine,
    *,
    identity: NodeIdentity | None = None,
    home: Path | None = None,
    settings: ProviderSettings | None = None,
    gate_factory: GateFactory | None = None,
    payments: ProviderPayments | None = None,
) -> AsyncIterator[ProviderNode]:
    """Run a provider until the block exits. Identity comes from `home` unless given.
    `payments` attaches the payment service in one place: its gates admit the jobs, its
    handler learns channels, its watcher runs with the node, its payee is advertised."""
    from meshnode.engine.supervised import SupervisedEngine

    if identity is None:
        if home is None:
            raise ValueError("provider_node needs an identity or a home directory")
        identity, _ = load_or_create(home)
    settings = settings or ProviderSettings()
    if payments is not None:
        gate_factory = payments.gates
        settings = dataclasses.replace(settings, ton=settings.ton or payments.payee)
    async with running_host(identity, settings.listen) as host:
        node = ProviderNode(host, identity, engine, settings, gate_factory)
        await node.refresh_evidence()
        node.install()
        async with background_tasks() as nursery:
            nursery.start_soon(node.keep_evidence_fresh)
            if payments is not None:
                payments.install(host)
                await nursery.start(payments.run)
            if settings.bootstrap or settings.relay:
                announcer = node.announcer = ProviderAnnouncer(
                    host,
                    node.signed_advert,
                    [engine.info.model_id],
                    settings.bootstrap,
                    relay_addrs=settings.relay,
                )
                node.jobs.on_load_change = lambda _active, _queued: announcer.load_changed()
                if isinstance(engine, SupervisedEngine):
                    # A runner crash or recovery changes what we offer: say so at once.
                    engine.on_state_change = lambda _state: announcer.load_changed()
                await nursery.start(announcer.run)
            yield node


class ClientNode:
    """A light peer, composed of a verified directory, a dialer and persisted peer
    statistics (meshnode.client), with routed jobs on top: `ask` runs one job on a given
    provider, `complete` routes a job with failover and payments."""

    def __init__(
        self,
        host: IHost,
        *,
        allow_insecure: bool = False,
        strategy: Strategy = Strategy.POWER_OF_TWO,
        stats_path: Path | None = None,
        policy_path: Path | None = None,
        payments: JobPayments | None = None,
    ) -> None:
        self.host = host
        self.verified = VerifiedDirectory(allow_insecure=allow_insecure, policy_path=policy_path)
        self.dialer = Dialer(host, self.verified)
        self.router = Router(strategy=strategy)
        self.peer_stats = PeerStatsFile(self.router, stats_path)
        self.peer_stats.load()
        self.stats = ClientStats()  # this session's jobs, for metrics and `meshnode status`
        self.job_deadline_s = DEFAULT_DEADLINE_S  # bounds a whole job on one provider
        self.discovery: ClientDiscovery | None = None
        # A spare job stream per recently used provider (run by client_node's nursery).
        self.job_streams = JobStreams(host)
        self.jobs = RoutedJobs(
            host=host,
            directory=self.verified.directory,
            router=self.router,
            dial=self.dialer.ensure_connected,
            payments=payments or PayNothing(),
            on_settled=self.peer_stats.save,
            streams=self.job_streams,
        )

    # --- the parts, as callers know them ------------------------------------------------

    @property
    def directory(self) -> Directory:
        return self.verified.directory

    @property
    def insecure(self) -> dict[str, bool]:
        return self.verified.insecure

    @property
    def allow_insecure(self) -> bool:
        return self.verified.allow_insecure

    @property
    def adverts(self) -> dict[str, Advert]:
        return self.verified.adverts

    @property
    def relay(self) -> RelayClient | None:
        return self.dialer.relay

    def verification(self, peer_id: str) -> str:
        return self.verified.verification(peer_id)

    def advert_of(self, peer_id: str | None, channel_key: bytes | None = None) -> Advert | None:
        return self.verified.advert_of(peer_id, channel_key)

    async def add_advert(self, data: bytes) -> InsertResult:
        return await self.verified.add(data)

    async def verify_pending(self) -> None:
        await self.verified.verify_pending()

    async def connect(self, addr: str) -> Advert:
        return await self.dialer.connect(addr)

    async def ensure_connected(self, advert: Advert) -> None:
        await self.dialer.ensure_connected(advert)

    async def find(self, model: str) -> int:
        return await self.verified.find(model, self.discovery)

    async def save_stats(self) -> None:
        await self.peer_stats.save()

    # --- jobs ---------------------------------------------------------------------------

    def dev_refused(self, model: str | None = None) -> int:
        """Providers (of `model`, id or name, if given) refused only because they run
        without a TEE: what `--insecure` would add. 0 when insecure is allowed."""
        if self.allow_insecure:
            return 0
        count = 0
        for listing in self.directory.peers(time.time()):
            if listing.verification is not Verification.FAILED:
                continue
            if not listing.verification_reason.startswith(f"{Reason.DEV}:"):
                continue
            if model is None or listing.advert.offer_for(model) is not None:
                count += 1
        return count

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
        """One job on one given provider, no routing (it must pass verification)."""
        # The verified advert, not whatever copy the caller holds.
        advert = self.verified.verified_advert(advert.peer_id)
        offer = advert.offer_for(model) if model else advert.models[0]
        if offer is None:
            raise LookupError(f"provider {advert.peer_id} does not serve {model!r}")
        self.stats.started()
        # Each wait inside the job has its own timeout; this bounds the whole job, so a
        # provider trickling tokens (or payment requests) cannot hold the caller forever.
        try:
            with trio.move_on_after(self.job_deadline_s) as deadline:
                result = await run_job(
                    self.host,
                    ID.from_base58(advert.peer_id),
                    advert.job_pubkey,
                    JobRequest(
                        model_id=offer.id, prompt=prompt, max_tokens=max_tokens,
                        params=params or {},
                    ),
                    on_text=on_text,
                    payer=payer,
                    streams=self.job_streams,
                )
                self.stats.completed(result.usage, result.ttft_s, result.elapsed_s)
                return result
            assert deadline.cancelled_caught
            raise JobError("deadline", f"no complete answer within {self.job_deadline_s:.0f} s",
                           before_first_token=False)
        except JobError as exc:
            self.stats.failed(exc.code)
            raise

    async def complete(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int = 128,
        params: dict[str, Any] | None = None,
        on_text: OnText | None = None,
    ) -> RoutedResult:
        """A job on the best provider of `model` (id or name), with failover."""
        self.stats.started()
        try:
            await self.find(model)
            result = await self.jobs.complete(
                model, prompt, max_tokens=max_tokens, params=params or {}, on_text=on_text
            )
        except JobError as exc:
            self.stats.failed(exc.code)
            raise
        except NoProvider as exc:
            self.stats.failed("no_provider")
            refused = self.dev_refused(model)
            if refused:
                raise NoProvider(
                    f"{exc}; {refused} provider(s) of it run without a TEE (dev attestation) "
                    "and are refused unless you pass --insecure", attempts=exc.attempts,
                ) from exc
            raise
        self.stats.completed(result.usage, result.ttft_s, result.elapsed_s)
        return result

    def ran_insecure(self, result: RoutedResult) -> bool:
        return any(self.insecure.get(s.provider, True) for s in result.segments
                   if s.completion_tokens)


@node_context
async def client_node(
    *,
    identity: NodeIdentity | None = None,
    listen: str = DEFAULT_LISTEN,
    allow_insecure: bool = False,
    strategy: Strategy = Strategy.POWER_OF_TWO,
    stats_path: Path | None = None,
    payments: JobPayments | None = None,
    bootstrap: Sequence[str] = (),
    policy_path: Path | None = None,
) -> AsyncIterator[ClientNode]:
    """A light client. Its identity is ephemeral by default: a client has no reputation
    to keep, and a fresh peer id per session is better for privacy. With `bootstrap`
    it joins the mesh (DHT client mode + advert gossip) and can dial relayed providers."""
    async with running_host(identity or NodeIdentity.generate(), listen) as host:
        node = ClientNode(
            host,
            allow_insecure=allow_insecure,
            strategy=strategy,
            stats_path=stats_path,
            payments=payments,
            policy_path=policy_path,
        )
        async with AsyncExitStack() as stack:
            # Everything the body may use is entered before the task nursery, so the
            # tasks are cancelled first and these close after them, never under a
            # cancelled scope (which would replace the body's exception).
            if bootstrap:
                node.dialer.relay = await stack.enter_async_context(RelayClient(host).running())
            nursery = await stack.enter_async_context(background_tasks())
            await nursery.start(node.job_streams.run)
            nursery.start_soon(node.verified.verify_loop)
            nursery.start_soon(node.dialer.keep_pinned_fresh)  # providers given by --peer
            if isinstance(payments, PaymentService):
                payments.attach(host, node.ensure_connected, node.advert_of)
                await nursery.start(payments.run)
            if bootstrap:
                node.discovery = ClientDiscovery(
                    host, node.directory, bootstrap, on_insert=node.verified.on_discovered
                )
                await nursery.start(node.discovery.run)
            try:
                yield node
            finally:
                with trio.CancelScope(shield=True):
                    await node.save_stats()
