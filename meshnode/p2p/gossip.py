"""Gossipsub topic `/meshnode/adverts/1`: signed adverts spread to every subscriber.

Every role subscribes (providers and bootstrap nodes too), because gossipsub only
forwards along the mesh of subscribers: a node that does not subscribe does not relay.
A topic validator drops anything that is not a valid advert published by the peer it
describes, so junk is neither delivered nor forwarded; receivers still put every
message through ``Directory.insert`` (seq, rate and size rules live there).

Before any of that, ``MeshPubsub`` admits each new message against token buckets per
forwarding peer and for the node (``core/ratelimit.py``), so a junk flood costs bounded
signature checks. Not covered: py-libp2p checks the signed peer record an RPC may carry
before we see its messages (one check per RPC, not per message).

py-libp2p's gossipsub defaults do not suit this topic (DESIGN.md, "Known py-libp2p
behaviours"); each parameter below is set on purpose, with its reason.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import libp2p.pubsub.pubsub as pubsub_module
import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from meshnode.core.advert import AdvertRejected, decode_and_verify
from meshnode.core.directory import Directory, InsertResult
from meshnode.core.ratelimit import RateLimiter

log = logging.getLogger(__name__)

ADVERT_TOPIC = "/meshnode/adverts/1"

# Mesh degree: go-libp2p's defaults (D=6, D_lo=4, D_hi=12) give each advert several
# disjoint paths while keeping duplicate deliveries per node around D.
GOSSIP_DEGREE = 6
GOSSIP_DEGREE_LOW = 4
GOSSIP_DEGREE_HIGH = 12
# Heartbeat: py-libp2p's default is 120 s, so a node that joins waits up to two minutes
# before it is grafted into the mesh and hears anything. go-libp2p uses 1 s; we do too.
GOSSIP_HEARTBEAT_S = 1
# Spam limit per forwarding peer and topic: py-libp2p's default is 10 msg/s, but one
# mesh neighbour (a bootstrap node, say) forwards *every* provider's adverts, so 20
# providers starting together would already be dropped and the neighbour penalised.
# 1000 providers republishing each minute average ~17 msg/s; 200 leaves a tenfold
# burst margin. Per-provider rate limits are enforced by Directory's token buckets.
GOSSIP_MAX_MSGS_PER_PEER_PER_S = 200.0
# Subscription queue: py-libp2p delivers into a 32-slot channel and *drops silently*
# when it is full. A node joining the mesh can receive one advert per provider within
# a heartbeat; 1024 matches Directory.DEFAULT_MAX_ENTRIES so such a burst fits.
SUBSCRIPTION_QUEUE_SIZE = 1024
# py-libp2p's per-peer outbound queue (32 RPCs) is not configurable; at one advert per
# provider per minute it only fills when a peer stops reading, and then dropping is
# what we want.
# Seen-message cache: longer than a heartbeat-driven IHAVE/IWANT round trip so a
# message is not re-delivered, shorter than the 60 s republish so memory stays small.
GOSSIP_SEEN_TTL_S = 120
# Admission before any signature check, per forwarding peer: a neighbour forwarding
# every provider's adverts (a bootstrap node) carries ~17 msg/s for 1000 providers
# plus load changes; 100/s with a burst of 200 leaves room for a joining node's
# catch-up and caps what one junk sender costs at 100 verifications per second.
GOSSIP_PEER_RATE_PER_S = 100.0
GOSSIP_PEER_BURST = 200.0
# Admission for the whole node: all forwarders together. Four busy neighbours' worth;
# the burst matches SUBSCRIPTION_QUEUE_SIZE, which is what the node can buffer anyway.
GOSSIP_GLOBAL_RATE_PER_S = 400.0
GOSSIP_GLOBAL_BURST = 1024.0
# Per-forwarder buckets kept; above py-libp2p's 300-connection cap, so a live
# neighbour's bucket is never dropped for a newcomer's.
GOSSIP_RATE_MAX_PEERS = 1024
# Publishing is queueing to mesh peers; it only blocks when the router is wedged.
PUBLISH_TIMEOUT_S = 5.0
# Pubsub starts its per-peer queue handler right away; if it has not within this
# time, the host is broken.
START_TIMEOUT_S = 10.0

_SUBSCRIPTION_SIZE_NAME = "SUBSCRIPTION_CHANNEL_SIZE"


class GossipCompatError(RuntimeError):
    """The installed py-libp2p no longer matches what this module adjusts."""


def widen_subscription_queue() -> None:
    """Raise py-libp2p's subscription channel size (a module constant read by
    ``Pubsub.subscribe``); fails loudly if an upgrade moved it."""
    current = getattr(pubsub_module, _SUBSCRIPTION_SIZE_NAME, None)
    if not isinstance(current, int):
        raise GossipCompatError(
            f"libp2p.pubsub.pubsub.{_SUBSCRIPTION_SIZE_NAME} is gone (py-libp2p changed); "
            "update meshnode.p2p.gossip.widen_subscription_queue"
        )
    if _SUBSCRIPTION_SIZE_NAME not in inspect.getsource(Pubsub.subscribe):
        raise GossipCompatError(
            f"Pubsub.subscribe no longer reads {_SUBSCRIPTION_SIZE_NAME}; the subscription "
            "queue may be back to 32: update meshnode.p2p.gossip.widen_subscription_queue"
        )
    setattr(pubsub_module, _SUBSCRIPTION_SIZE_NAME, SUBSCRIPTION_QUEUE_SIZE)


# trio's message when a task is started in a nursery that is closing.
_NURSERY_CLOSED = "Nursery is closed to new arrivals"
# Resetting a pubsub stream at shutdown is a local frame write; don't wait longer.
STREAM_RESET_TIMEOUT_S = 1.0


class MeshPubsub(Pubsub):
    """Pubsub that drops messages over the rate limit before py-libp2p checks their
    signature, runs the topic validator or delivers them. Duplicates of messages
    already seen are let through uncharged: py-libp2p drops them without any check."""

    def __init__(
        self,
        host: IHost,
        router: GossipSub,
        limiter: RateLimiter,
        on_dropped: Callable[[], None],
    ) -> None:
        if not callable(getattr(Pubsub, "_is_msg_seen", None)):
            raise GossipCompatError(
                "Pubsub._is_msg_seen is gone (py-libp2p changed); update MeshPubsub.push_msg"
            )
        super().__init__(host, router, seen_ttl=GOSSIP_SEEN_TTL_S)
        self.limiter = limiter
        self._on_dropped = on_dropped

    async def stream_handler(self, stream: INetStream) -> None:
        try:
            await super().stream_handler(stream)
        except RuntimeError as exc:
            # py-libp2p 0.8.1 checks `manager.is_running`, then starts a task in the
            # pubsub service's nursery; when the node stops while messages still arrive,
            # that nursery closes in between and the error would fail the whole host's
            # teardown. Only that one error is swallowed; the stream is reset.
            if _NURSERY_CLOSED not in str(exc):
                raise
            with trio.CancelScope(shield=True), trio.move_on_after(STREAM_RESET_TIMEOUT_S):
                try:
                    await stream.reset()
                except Exception:  # already gone with its connection
                    pass

    async def push_msg(self, msg_forwarder: ID, msg: rpc_pb2.Message) -> None:
        if msg_forwarder != self.my_id and not self._is_msg_seen(msg):
            if not self.limiter.admit(msg_forwarder, trio.current_time()):
                self._on_dropped()
                return
        await super().push_msg(msg_forwarder, msg)


def gossip_rate_limiter(
    *,
    peer_rate: float = GOSSIP_PEER_RATE_PER_S,
    peer_burst: float = GOSSIP_PEER_BURST,
    global_rate: float = GOSSIP_GLOBAL_RATE_PER_S,
    global_burst: float = GOSSIP_GLOBAL_BURST,
) -> RateLimiter:
    """The admission limiter of one node's advert gossip (on trio's clock)."""
    return RateLimiter(
        key_rate=peer_rate,
        key_burst=peer_burst,
        global_rate=global_rate,
        global_burst=global_burst,
        max_keys=GOSSIP_RATE_MAX_PEERS,
        now=trio.current_time(),
    )


def make_router() -> GossipSub:
    return GossipSub(
        protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
        degree=GOSSIP_DEGREE,
        degree_low=GOSSIP_DEGREE_LOW,
        degree_high=GOSSIP_DEGREE_HIGH,
        heartbeat_interval=GOSSIP_HEARTBEAT_S,
        max_messages_per_topic_per_second=GOSSIP_MAX_MSGS_PER_PEER_PER_S,
    )


class AdvertGossip:
    """One node's membership of the advert topic.

    ``rejected`` counts adverts the topic validator dropped, by reason; ``inserted`` and
    the Directory's own counters cover what reached ``feed``.
    """

    def __init__(
        self,
        host: IHost,
        *,
        clock: Callable[[], float] = time.time,
        limiter: RateLimiter | None = None,
    ) -> None:
        widen_subscription_queue()
        self.host = host
        self.clock = clock
        self.router = make_router()
        self.limiter = limiter if limiter is not None else gossip_rate_limiter()
        self.pubsub = MeshPubsub(host, self.router, self.limiter, self._rate_limited)
        self.pubsub.set_topic_validator(ADVERT_TOPIC, self._validate, False)
        self.rejected: Counter[str] = Counter()
        self.received = 0
        self.published = 0
        self._messages: trio.MemoryReceiveChannel[rpc_pb2.Message] | None = None

    def _rate_limited(self) -> None:
        self.rejected["rate_limited"] += 1

    def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        try:
            advert = decode_and_verify(msg.data, self.clock())
        except AdvertRejected as exc:
            self.rejected[exc.reason.value] += 1
            return False
        if advert.peer_id != ID(msg.from_id).to_base58():
            # Only a provider may gossip its own advert: rate limits and scoring are
            # per origin, and a third party replaying adverts would dodge both.
            self.rejected["not_from_origin"] += 1
            return False
        return True

    @asynccontextmanager
    async def running(self) -> AsyncIterator[AdvertGossip]:
        """Run pubsub and the router and subscribe to the topic for the block."""
        async with (
            background_trio_service(self.pubsub),
            background_trio_service(self.router),
        ):
            with trio.fail_after(START_TIMEOUT_S):
                await self.pubsub.wait_until_ready()
            subscription = await self.pubsub.subscribe(ADVERT_TOPIC)
            self._messages = subscription.receive_channel  # type: ignore[attr-defined]
            yield self

    async def publish(self, signed_advert: bytes) -> None:
        with trio.fail_after(PUBLISH_TIMEOUT_S):
            await self.pubsub.publish(ADVERT_TOPIC, signed_advert)
        self.published += 1

    def has_topic_peers(self) -> bool:
        """Whether any connected peer is subscribed to the topic (a publish reaches it)."""
        return bool(self.pubsub.peer_topics.get(ADVERT_TOPIC))

    def mesh_peers(self) -> set[ID]:
        return set(self.router.mesh.get(ADVERT_TOPIC, set()))

    async def feed(
        self,
        directory: Directory | None,
        on_insert: Callable[[InsertResult], None] | None = None,
    ) -> None:
        """Put every advert heard into ``directory`` (or just drain the topic when None,
        as a provider does, so py-libp2p's queue never fills). Never returns."""
        if self._messages is None:
            raise RuntimeError("AdvertGossip.feed called outside AdvertGossip.running()")
        async for msg in self._messages:
            self.received += 1
            if directory is None:
                continue
            result = directory.insert(msg.data, self.clock())
            if on_insert is not None:
                on_insert(result)
