"""Discovery without a gateway: who serves a model, learned from the mesh itself.

Three roles, each a service with ``async def run(task_status)`` that the caller starts
in a nursery it owns (``await nursery.start(service.run)``); everything a role starts
lives in that task and ends with it.

- ``BootstrapNode``: DHT server, gossip member and circuit-relay server; serves no model.
  New nodes need one bootstrap address to enter.
- ``ProviderAnnouncer``: a provider's presence. Publishes its signed advert on the gossip
  topic (periodically and, rate-limited, when its load changes), provides each model id
  in the DHT and stores its advert there for cold starts, and, when it cannot accept
  inbound connections, holds a relay slot and exposes the circuit address to put in
  its advert.
- ``ClientDiscovery``: a light client's view. Feeds every advert heard on the topic
  into its ``Directory``; ``find`` answers from the directory and falls back to a DHT
  lookup when it holds no fresh *verified* advert for the model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from typing import Protocol

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.tools.anyio_service import background_trio_service
from trio_typing import TaskStatus

from meshnode.attest.advert_check import policy_advert_check
from meshnode.core.advert import AdvertRejected, decode_and_verify
from meshnode.core.directory import AttestCheck, Directory, InsertResult, Provider
from meshnode.p2p.dht import (
    BOOTSTRAP_DIAL_TIMEOUT_S,
    DhtError,
    MeshKadDHT,
    announce,
    fetch_advert_record,
    find_provider_ids,
    join,
    make_dht,
)
from meshnode.p2p.directory_sync import fetch_snapshot, install_snapshot_server
from meshnode.p2p.gossip import AdvertGossip
from meshnode.p2p.host import parse_peer_addr
from meshnode.p2p.relay import RelayClient, RelayError, running_relay_server

log = logging.getLogger(__name__)

# Gossip republish period: Directory sustains one advert per 5 s per peer and adverts
# live minutes; once a minute keeps listings fresh and costs ~17 msg/s per 1000
# providers network-wide.
GOSSIP_REPUBLISH_S = 60.0
# Load-change publishes are debounced to this, matching Directory.RATE_PER_S (0.2/s):
# publishing faster would only be rejected as rate_limited by every receiver.
LOAD_PUBLISH_MIN_INTERVAL_S = 5.0
# DHT refresh period ceiling; the actual period is half the advert's lifetime if that
# is shorter, so the stored advert never expires while the provider is up.
DHT_REFRESH_MAX_S = 120.0
# After a failed DHT announce (no server reachable yet), retry this soon.
DHT_RETRY_S = 15.0
# On start, wait at most this long for a gossip neighbour on the topic before the first
# publish (a publish with no neighbour reaches nobody); the heartbeat is 1 s.
FIRST_PUBLISH_WAIT_S = 3.0
_TOPIC_POLL_S = 0.1  # how often the first-publish wait looks for topic neighbours
# Expired listings are dropped this often; they are already ignored by queries.
EXPIRE_INTERVAL_S = 30.0
# Adverts of the providers found in one DHT lookup are fetched this many at a time:
# enough to finish a k=20 answer in a couple of rounds without a burst of streams.
ADVERT_FETCH_CONCURRENCY = 8
# Default bound for ClientDiscovery.find: a DHT lookup plus advert fetches.
FIND_TIMEOUT_S = 20.0

OnInsert = Callable[[InsertResult], None]


class AdvertPublisher(Protocol):
    """What the announcer's gossip loop needs of ``AdvertGossip``."""

    async def publish(self, signed_advert: bytes) -> None: ...

    def has_topic_peers(self) -> bool: ...


def _parse_bootstrap(addrs: Sequence[str]) -> list[PeerInfo]:
    return [parse_peer_addr(a) for a in addrs]


def _is_model_id(model: str) -> bool:
    return len(model) == 64 and all(c in "0123456789abcdef" for c in model)


class BootstrapNode:
    """Entry point of the mesh: DHT server, gossip member, relay server; no model."""

    def __init__(
        self,
        host: IHost,
        peers: Sequence[str] = (),
        *,
        relay: bool = True,
        directory: Directory | None = None,
        attest: AttestCheck | None = None,
    ) -> None:
        self.host = host
        self.peers = _parse_bootstrap(peers)
        self.relay = relay
        # Bootstrap nodes keep a directory too: clients load it as their first snapshot.
        # Its entries are checked against the attestation policy before they are stored,
        # so a flood of fresh keys cannot evict a verified provider (core/directory.py).
        if directory is None:
            directory = Directory(attest=attest if attest is not None else policy_advert_check())
        self.directory = directory
        self.dht: MeshKadDHT | None = None
        self.gossip: AdvertGossip | None = None

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        dht = self.dht = make_dht(self.host, server=True)
        gossip = self.gossip = AdvertGossip(self.host)
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(background_trio_service(dht))
            await stack.enter_async_context(gossip.running())
            if self.relay:
                await stack.enter_async_context(running_relay_server(self.host))
            nursery = await stack.enter_async_context(trio.open_nursery())
            if self.peers:
                await join(dht, self.host, self.peers)
            nursery.start_soon(dht.prune_loop)
            install_snapshot_server(self.host, self.directory)
            nursery.start_soon(gossip.feed, self.directory)
            nursery.start_soon(_expire_loop, self.directory, time.time)
            task_status.started()
            await trio.sleep_forever()


class ProviderAnnouncer:
    """Keeps a provider findable. ``node_advert_fn`` returns a freshly signed advert
    (new seq) each call; include ``circuit_addrs`` in it when ``relay_addrs`` is set."""

    def __init__(
        self,
        host: IHost,
        node_advert_fn: Callable[[], bytes],
        model_ids: Sequence[str],
        bootstrap_addrs: Sequence[str],
        *,
        gossip: bool = True,
        dht: bool = True,
        dht_server: bool = True,
        relay_addrs: Sequence[str] = (),
        republish_s: float = GOSSIP_REPUBLISH_S,
        load_publish_min_interval_s: float = LOAD_PUBLISH_MIN_INTERVAL_S,
    ) -> None:
        bad = [m for m in model_ids if not _is_model_id(m)]
        if bad:
            raise ValueError(f"model ids must be 64-char lowercase hex sha256, got {bad[0]!r}")
        if republish_s <= 0 or load_publish_min_interval_s < 0:
            raise ValueError("republish_s must be > 0 and the load interval >= 0")
        self.host = host
        self.node_advert_fn = node_advert_fn
        self.model_ids = list(model_ids)
        self.bootstrap = _parse_bootstrap(bootstrap_addrs)
        self.use_gossip = gossip
        self.use_dht = dht
        # A provider that cannot accept inbound connections must not be a DHT server:
        # others would list it and then fail to reach it.
        self.dht_server = dht_server and not relay_addrs
        self.relay_addrs = list(relay_addrs)
        self.republish_s = republish_s
        self.load_interval_s = load_publish_min_interval_s
        self.relay_client: RelayClient | None = None
        self.gossip: AdvertGossip | None = None
        self.dht: MeshKadDHT | None = None
        self.dht_announces = 0
        self._load_changed = trio.Event()

    @property
    def circuit_addrs(self) -> list[str]:
        """Circuit addresses reserved so far; put them in the advert's addrs."""
        return [] if self.relay_client is None else self.relay_client.circuit_addrs

    def load_changed(self) -> None:
        """Ask for an early gossip publish (debounced to the load interval)."""
        self._load_changed.set()

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with AsyncExitStack() as stack:
            nursery = await stack.enter_async_context(trio.open_nursery())
            if self.use_dht:
                self.dht = make_dht(self.host, server=self.dht_server)
                await stack.enter_async_context(background_trio_service(self.dht))
            if self.use_gossip:
                self.gossip = AdvertGossip(self.host)
                await stack.enter_async_context(self.gossip.running())
            # Reserve only now: py-libp2p's pubsub ignores connections made before it
            # started, so connecting to the relay (a bootstrap node) earlier would leave
            # this provider without gossip peers.
            if self.relay_addrs:
                self.relay_client = RelayClient(self.host)
                await stack.enter_async_context(self.relay_client.running())
                reserved = 0
                for addr in self.relay_addrs:
                    try:
                        await self.relay_client.reserve(addr, nursery)
                        reserved += 1
                    except RelayError as exc:
                        log.warning("relay reservation failed: %s", exc)
                if not reserved:
                    raise RelayError(
                        f"no relay of {len(self.relay_addrs)} gave a slot; this provider "
                        "cannot be reached (check the relay addresses)"
                    )
            inner = await stack.enter_async_context(trio.open_nursery())
            if self.dht is not None:
                await join(self.dht, self.host, self.bootstrap)
                await self._announce_dht()
                inner.start_soon(self._dht_loop, self.dht)
                if self.dht_server:
                    inner.start_soon(self.dht.prune_loop)
            else:
                await _connect_all(self.host, self.bootstrap)
            if self.gossip is not None:
                inner.start_soon(self.gossip.feed, None)
                inner.start_soon(self._gossip_loop, self.gossip)
            task_status.started()
            await trio.sleep_forever()

    async def _announce_dht(self) -> float:
        """One DHT announce; the delay until the next."""
        assert self.dht is not None
        data = self.node_advert_fn()
        try:
            await announce(self.dht, self.model_ids, data)
        except (DhtError, AdvertRejected) as exc:
            log.warning("DHT announce failed, retrying in %.0f s: %s", DHT_RETRY_S, exc)
            return DHT_RETRY_S
        self.dht_announces += 1
        advert = decode_and_verify(data, time.time())
        return min(DHT_REFRESH_MAX_S, (advert.expires_at - advert.issued_at) / 2)

    async def _dht_loop(self, dht: MeshKadDHT) -> None:
        delay = DHT_REFRESH_MAX_S
        while True:
            await trio.sleep(delay)
            delay = await self._announce_dht()

    async def _gossip_loop(self, gossip: AdvertPublisher) -> None:
        with trio.move_on_after(FIRST_PUBLISH_WAIT_S):
            while not gossip.has_topic_peers():
                await trio.sleep(_TOPIC_POLL_S)
        while True:
            # A fresh event *before* signing and publishing: a load change that lands
            # while this advert is built or sent sets the new event and is published
            # next (replacing it after the await would lose that wake-up).
            self._load_changed = trio.Event()
            try:
                await gossip.publish(self.node_advert_fn())
            except (trio.TooSlowError, AdvertRejected) as exc:
                log.warning("gossip publish failed: %s", exc)
            last = trio.current_time()
            with trio.move_on_after(self.republish_s):
                await self._load_changed.wait()
                await trio.sleep_until(last + self.load_interval_s)


class ClientDiscovery:
    """A light client's directory of providers, kept by gossip and the DHT."""

    def __init__(
        self,
        host: IHost,
        directory: Directory,
        bootstrap_addrs: Sequence[str],
        *,
        gossip: bool = True,
        on_insert: OnInsert | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.directory = directory
        self.bootstrap = _parse_bootstrap(bootstrap_addrs)
        self.use_gossip = gossip
        self.on_insert = on_insert
        self.clock = clock
        self.gossip: AdvertGossip | None = None
        self.dht: MeshKadDHT | None = None
        self.dht_joined = trio.Event()
        self.dht_lookups = 0

    def _insert(self, data: bytes) -> InsertResult:
        result = self.directory.insert(data, self.clock())
        if self.on_insert is not None:
            self.on_insert(result)
        return result

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with AsyncExitStack() as stack:
            self.dht = make_dht(self.host, server=False)
            await stack.enter_async_context(background_trio_service(self.dht))
            if self.use_gossip:
                self.gossip = AdvertGossip(self.host, clock=self.clock)
                await stack.enter_async_context(self.gossip.running())
            nursery = await stack.enter_async_context(trio.open_nursery())
            if await _connect_all(self.host, self.bootstrap) == 0 and self.bootstrap:
                log.warning("no bootstrap peer reachable; discovery has nothing to ask")
            if self.gossip is not None:
                nursery.start_soon(self.gossip.feed, self.directory, self.on_insert)
            nursery.start_soon(_expire_loop, self.directory, self.clock)
            # The snapshot makes the client useful in one round trip; filling the DHT
            # routing table takes several, so it runs behind it and `find` waits for it.
            await self.load_snapshots()
            nursery.start_soon(self._join_dht)
            task_status.started()
            await trio.sleep_forever()

    async def _join_dht(self) -> None:
        assert self.dht is not None
        try:
            await join(self.dht, self.host, self.bootstrap)
        finally:
            self.dht_joined.set()

    async def load_snapshots(self) -> int:
        """Insert the adverts the bootstrap peers hold (cold start in one round trip)."""
        accepted = 0
        for info in self.bootstrap:
            try:
                adverts = await fetch_snapshot(self.host, info.peer_id)
            except Exception as exc:  # an old or broken bootstrap peer: gossip/DHT remain
                log.info("no directory snapshot from %s: %s", info.peer_id, exc)
                continue
            accepted += sum(self._insert(data).accepted for data in adverts)
        return accepted

    async def find(self, model: str, timeout: float = FIND_TIMEOUT_S) -> list[Provider]:
        """Live providers of ``model`` (id or name): the directory's if it holds a verified
        one, else also those a DHT lookup turns up (by model id only: the DHT is keyed by
        id). Unverified entries do not stop the lookup: a flood of fresh keys offering
        the model must not hide the real providers that the DHT still knows."""
        found = self.directory.providers_for(model, self.clock())
        if any(p.listing.verified for p in found) or not _is_model_id(model):
            return found
        if self.dht is None:
            raise RuntimeError("ClientDiscovery.find called before run() started")
        with trio.move_on_after(timeout):
            await self.lookup(model)
        return self.directory.providers_for(model, self.clock())

    async def lookup(self, model_id: str) -> int:
        """Ask the DHT for providers of ``model_id`` and insert their adverts; how many
        were accepted."""
        assert self.dht is not None
        dht = self.dht
        await self.dht_joined.wait()  # bounded: join has its own dial/refresh timeouts
        self.dht_lookups += 1
        peers = await find_provider_ids(dht, model_id)
        accepted = 0
        limiter = trio.CapacityLimiter(ADVERT_FETCH_CONCURRENCY)

        async def fetch(peer: ID) -> None:
            nonlocal accepted
            async with limiter:
                data = await fetch_advert_record(dht, peer)
            if data is not None and self._insert(data).accepted:
                accepted += 1

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(fetch, peer)
        return accepted


async def _connect_all(host: IHost, peers: Sequence[PeerInfo]) -> int:
    reached = 0
    for info in peers:
        try:
            with trio.fail_after(BOOTSTRAP_DIAL_TIMEOUT_S):
                await host.connect(info)
            reached += 1
        except Exception as exc:  # one dead bootstrap peer must not stop the others
            log.warning("bootstrap peer %s unreachable: %s", info.peer_id, exc)
    return reached


async def _expire_loop(directory: Directory, clock: Callable[[], float]) -> None:
    while True:
        await trio.sleep(EXPIRE_INTERVAL_S)
        directory.expire(clock())
