"""Kademlia DHT for cold-start discovery: provider records per model, adverts per peer.

A provider announces itself as a provider of each model it serves (the record key is a
namespaced hash of the model id, see ``provider_key``) and stores its signed advert as a
value record under ``/meshnode-advert/<peer id>``. A client asks the DHT who provides a
model, then fetches each provider's advert by peer id and checks it like any other.

Roles: providers and bootstrap nodes run the DHT in server mode (they answer queries
and hold records); light clients run it in client mode (they only ask, and never get
listed in anyone's routing table).

py-libp2p 0.8 behaviours handled here (see DESIGN.md):
- a server adds *any* peer that opens a KAD stream to its routing table, client-mode
  peers included; ``MeshKadDHT`` re-checks and prunes peers that do not serve KAD;
- ``find_providers`` returns duplicates: ``find_provider_ids`` dedupes by peer id;
- ``find_providers`` and ``get_value`` answer from a local cache first, so a client
  would keep re-reading its first answer; client lookups drop that cache before asking;
- values without a validator for their namespace are accepted unchecked (1 MiB each,
  up to 50,000 of them) unless strict validation is on; ``make_dht`` turns it on with
  ``AdvertRecordValidator`` as the only namespace (py-libp2p's ``pk``/``ipns`` defaults
  are left out: we never use them), so a server stores adverts and nothing else;
- the value store keeps records for 24 h whatever they say; ``BoundedValueStore`` caps
  the count, drops records whose advert no longer validates (expired) when full, and
  then refuses new ones rather than evicting live ones.

Not covered here: py-libp2p reads a whole DHT message (up to 4 MiB) before any check;
that memory is per stream and freed with it. Provider records (ADD_PROVIDER) are left to
py-libp2p's own per-peer rate limit.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.value_store import ValueStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.records.utils import InvalidRecordType
from libp2p.records.validator import NamespacedValidator, Validator

from meshnode.core.advert import MAX_ADVERT_BYTES, AdvertRejected, decode_and_verify
from meshnode.core.peerid import MAX_PEER_ID_TEXT_LEN
from meshnode.core.text import shown

log = logging.getLogger(__name__)

ADVERT_NAMESPACE = "meshnode-advert"
ADVERT_KEY_TAG = b"meshnode/advert-key/1\x00"
ADVERT_KEY_HEX_CHARS = 32  # 128 bits of the peer id's hash: key stays within 50 bytes
# Provider keys hash the model id under this tag, so a meshnode provider record never
# collides with an IPFS record for the GGUF file itself (whose CID is also a sha256).
PROVIDER_KEY_TAG = b"meshnode/model-provider/1\x00"
_SHA256_MULTIHASH_PREFIX = "1220"  # multihash: code 0x12 (sha2-256), length 0x20

# One DHT lookup on a healthy network is a few round trips; 15 s covers a 10 s
# per-peer query timeout (py-libp2p's QUERY_TIMEOUT) plus one more hop.
LOOKUP_TIMEOUT_S = 15.0
# Storing a record is a lookup plus one store round per close peer (ALPHA at a time).
STORE_TIMEOUT_S = 30.0
# Dialing a bootstrap peer on the internet takes well under a second; a dead one must
# not hold the node's start for long.
BOOTSTRAP_DIAL_TIMEOUT_S = 10.0
# A routing-table refresh is a handful of lookups (one per non-empty bucket).
REFRESH_TIMEOUT_S = 30.0
# Identify normally answers within a round trip after connect; prune checks run this
# often so a client that slipped into a server's table is gone within seconds.
PRUNE_INTERVAL_S = 5.0
# Value records a node keeps: one advert per provider, four times the directory's
# 1024 entries, so a node can hold the records of a large mesh; at MAX_ADVERT_BYTES
# each that is at most 256 MiB, but real adverts are ~1-4 KiB (~16 MiB).
MAX_VALUE_RECORDS = 4096
# A provider record lists at most this many peers per model (py-libp2p's per-key cap
# is k = 20 per server); the router needs a handful, gossip fills in the rest.
MAX_PROVIDERS_PER_LOOKUP = 20


class DhtError(Exception):
    """A DHT operation failed in a way the caller should report."""


def advert_key(peer_id: str) -> str:
    """The value-record key holding a peer's signed advert.

    py-libp2p servers reject FIND_NODE keys over 50 bytes that are not multihashes, and
    ``put_value``/``get_value`` look up the key itself, so the peer id (52 chars) cannot
    appear verbatim: the key carries 128 bits of its hash (49 bytes in all). Collisions
    only matter for whose record a slot holds, and the validator pins each slot to the
    one peer whose id hashes to it.
    """
    if not peer_id or len(peer_id) > MAX_PEER_ID_TEXT_LEN or "/" in peer_id:
        raise ValueError(f"not a peer id: {peer_id[:80]!r}")
    digest = hashlib.sha256(ADVERT_KEY_TAG + peer_id.encode("ascii")).hexdigest()
    return f"/{ADVERT_NAMESPACE}/{digest[:ADVERT_KEY_HEX_CHARS]}"


def provider_key(model_id: str) -> str:
    """The provider-record key for a model id, as the hex multihash py-libp2p expects."""
    digest = hashlib.sha256(PROVIDER_KEY_TAG + model_id.encode("utf-8")).hexdigest()
    return _SHA256_MULTIHASH_PREFIX + digest


class AdvertRecordValidator(Validator):
    """Accepts a value under ``/meshnode-advert/<peer id>`` only if it is a valid,
    unexpired advert of that very peer; among several, prefers the highest seq."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def validate(self, key: str, value: bytes) -> None:
        if len(value) > MAX_ADVERT_BYTES:  # before decoding anything
            raise ValueError(f"advert record of {len(value)} bytes > {MAX_ADVERT_BYTES}")
        try:
            advert = decode_and_verify(value, self._clock())
        except AdvertRejected as exc:
            raise ValueError(f"advert record for {shown(key)} rejected: {exc}") from exc
        if key != advert_key(advert.peer_id):
            raise ValueError(f"advert of {advert.peer_id} stored under foreign key {shown(key)}")

    def select(self, key: str, values: list[bytes]) -> int:
        best, best_seq = 0, -1
        now = self._clock()
        for i, value in enumerate(values):
            try:
                seq = decode_and_verify(value, now).seq
            except AdvertRejected:
                continue
            if seq > best_seq:
                best, best_seq = i, seq
        return best


class ValueStoreFull(ValueError):
    """The value store holds MAX_VALUE_RECORDS live records; a new key is refused."""


class BoundedValueStore(ValueStore):
    """py-libp2p's value store with a count cap. When full, records that no longer
    validate (expired adverts) are dropped first; if none is, a server refuses a record
    under a new key with ``ValueStoreFull`` (the PUT_VALUE handler then resets the
    stream), so a flood cannot evict the records of live providers. A client's store is
    only a cache of what it fetched: there the oldest record makes room instead, so a
    lookup never fails for want of space."""

    def __init__(
        self,
        inner: ValueStore,
        validator: NamespacedValidator,
        max_records: int,
        *,
        refuse_when_full: bool = True,
    ) -> None:
        super().__init__(inner.host, inner.local_peer_id)
        self.validator = validator
        self.max_records = max_records
        self.refuse_when_full = refuse_when_full
        self.refused = 0

    def _make_room(self, key: bytes, *, refuse: bool) -> None:
        if key in self.store or len(self.store) < self.max_records:
            return
        for k, (record, _) in list(self.store.items()):
            try:
                self.validator.validate(k.decode("utf-8"), record.value)
            except (ValueError, UnicodeDecodeError, InvalidRecordType):
                del self.store[k]
        if len(self.store) >= self.max_records:
            if refuse:
                self.refused += 1
                raise ValueStoreFull(f"value store holds {self.max_records} live records")
            del self.store[next(iter(self.store))]  # dicts keep insertion order: oldest

    def put_record(self, key: bytes, record: Record) -> None:
        """A record from the network (a PUT_VALUE, or a lookup's answer cached)."""
        self._make_room(key, refuse=self.refuse_when_full)
        super().put_record(key, record)

    def put(self, key: bytes, value: bytes, validity: float = 0.0) -> None:
        """Our own record: always stored (the oldest other record makes room)."""
        self._make_room(key, refuse=False)
        super().put(key, value, validity)


class MeshKadDHT(KadDHT):
    """KadDHT that stores only adverts, in a bounded store, and keeps client-mode peers
    out of its routing table.

    py-libp2p adds every peer that opens a KAD stream with the server-mode check
    skipped; we always check, and prune peers once identify shows they lack KAD (the
    check passes while identify has not answered yet).
    """

    def __init__(self, host: IHost, mode: DHTMode, *, max_records: int = MAX_VALUE_RECORDS) -> None:
        validator = NamespacedValidator(
            {ADVERT_NAMESPACE: AdvertRecordValidator()}, strict_validation=True
        )
        super().__init__(
            host, mode, validator=validator, validator_changed=True, strict_validation=True
        )
        self.value_store = BoundedValueStore(
            self.value_store, validator, max_records, refuse_when_full=mode is DHTMode.SERVER
        )

    async def add_peer(self, peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        return await super().add_peer(peer_id, skip_server_mode_check=False)

    def prune_non_servers(self) -> list[ID]:
        removed = []
        store = self.host.get_peerstore()
        for peer_id in self.routing_table.get_peer_ids():
            try:
                protocols = store.get_protocols(peer_id)
            except Exception:  # peer unknown to the peerstore: nothing to judge yet
                continue
            if protocols and str(KAD_PROTOCOL_ID) not in protocols:
                self.routing_table.remove_peer(peer_id)
                removed.append(peer_id)
        return removed

    async def prune_loop(self) -> None:
        while True:
            for peer_id in self.prune_non_servers():
                log.debug("dropped client-mode peer %s from the DHT routing table", peer_id)
            await trio.sleep(PRUNE_INTERVAL_S)


def make_dht(host: IHost, *, server: bool) -> MeshKadDHT:
    """A DHT node that stores validated adverts only; run it under
    ``background_trio_service``."""
    return MeshKadDHT(host, DHTMode.SERVER if server else DHTMode.CLIENT)


async def join(dht: KadDHT, host: IHost, bootstrap: Sequence[PeerInfo]) -> int:
    """Connect to bootstrap peers and fill the routing table; how many were reached.

    Tables fill only through ``refresh_routing_table``, so it runs once here."""
    reached = 0
    for info in bootstrap:
        if info.peer_id == host.get_id():
            continue
        try:
            with trio.fail_after(BOOTSTRAP_DIAL_TIMEOUT_S):
                await host.connect(info)
        except Exception as exc:  # one dead bootstrap peer must not stop the others
            log.warning("bootstrap peer %s unreachable: %s", info.peer_id, exc)
            continue
        await dht.add_peer(info.peer_id, skip_server_mode_check=True)
        reached += 1
    if reached:
        with trio.move_on_after(REFRESH_TIMEOUT_S):
            await dht.refresh_routing_table()
    return reached


async def announce(dht: KadDHT, model_ids: Sequence[str], signed_advert: bytes) -> None:
    """Provide each model and store the advert; raises DhtError if nothing was stored."""
    advert = decode_and_verify(signed_advert, time.time())
    provided = 0
    with trio.move_on_after(STORE_TIMEOUT_S):
        for model_id in model_ids:
            if await dht.provide(provider_key(model_id)):
                provided += 1
        key = advert_key(advert.peer_id)
        # put_value refuses to replace a local record the validator prefers; ours only
        # grows in seq, so dropping the local copy first is safe and avoids that check
        # racing with a clock step.
        dht.value_store.remove(key.encode("utf-8"))
        await dht.put_value(key, signed_advert)
    if model_ids and provided == 0:
        raise DhtError("no DHT peer accepted our provider records (is any server reachable?)")


async def find_provider_ids(dht: KadDHT, model_id: str) -> list[ID]:
    """Peer ids that announced ``model_id``, deduplicated, in the order first seen."""
    key = provider_key(model_id)
    if dht.mode is DHTMode.CLIENT:
        # A client holds no authoritative records: its cache only replays old answers.
        dht.provider_store.providers.pop(bytes.fromhex(key), None)
    found: list[ID] = []
    with trio.move_on_after(LOOKUP_TIMEOUT_S):
        for info in await dht.find_providers(key, MAX_PROVIDERS_PER_LOOKUP):
            if info.peer_id not in found:
                found.append(info.peer_id)
    return found


async def fetch_advert_record(dht: KadDHT, peer_id: ID) -> bytes | None:
    """The signed advert a peer stored in the DHT, or None if none was found in time."""
    key = advert_key(peer_id.to_base58())
    if dht.mode is DHTMode.CLIENT:
        dht.value_store.remove(key.encode("utf-8"))
    with trio.move_on_after(LOOKUP_TIMEOUT_S):
        return await dht.get_value(key)
    return None
