"""The client's view of the mesh: live, verified-signature adverts with TTL.

``Directory.insert`` takes advert bytes exactly as they arrived (gossip or DHT) and
either keeps the advert or says why not, counting every rejection by reason.

Admission policy, chosen so that no flood can push out good entries:

* one entry per peer; a newer ``seq`` replaces it, an older or equal one is
  ``STALE_SEQ`` (a replay) and costs the peer nothing;
* each peer has a token bucket, spent only by adverts that would be accepted, after the
  signature is checked — so only the key holder can drain its own bucket, and a replayer
  cannot get a victim's fresh adverts rate-limited;
* with an ``attest`` check (a bootstrap node passes one), new evidence is checked
  against the attestation policy *before* the advert is stored or evicts anything, and
  the entry is stored as verified or failed (pending only when the check cannot decide
  offline). Without one, entries start pending and the shell verifies them later;
* when the directory is full, a newcomer may take the place of an expired entry, or
  else of a live entry it outranks (failed < pending < verified), the lowest-ranked and
  soonest-expiring first. At equal trust the incumbent stays; if no entry qualifies, the
  newcomer is ``DIRECTORY_FULL``. A flood of fresh keys, however long its adverts live,
  therefore evicts no one it does not outrank: never a verified provider, and not even
  a failed one (a dev provider that a strict bootstrap node refuses).

Time is always a parameter; nothing here reads a clock.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from meshnode.core.advert import (
    Advert,
    AdvertRejected,
    ModelOffer,
    RejectReason,
    decode_and_verify,
)

# Far more providers than a client can usefully route among; the worst case (every
# advert at MAX_ADVERT_BYTES) stays around 64 MiB.
DEFAULT_MAX_ENTRIES = 1024
# A provider republishes on a timer and on load changes; a few changes can land together
# when several jobs start or finish at once.
RATE_BURST = 5.0
# One advert per 5 s sustained: load changes are debounced to about this by providers,
# and the periodic refresh is once a minute.
RATE_PER_S = 0.2
# Buckets outlive entries briefly (a peer that was just evicted keeps its debt); bound
# them so a stream of fresh keys cannot grow memory without limit.
MAX_RATE_BUCKETS_PER_ENTRY = 4
MAX_VERIFICATION_REASON_LEN = 200  # a one-line diagnostic, not a log


class Verification(StrEnum):
    PENDING = "pending"  # signature fine, attestation not yet checked
    VERIFIED = "verified"
    FAILED = "failed"


# Eviction order: a newcomer may only displace a live entry it outranks; at equal
# trust the incumbent stays (so a flood of fresh keys cannot churn out anyone).
_TRUST_RANK = {Verification.FAILED: 0, Verification.PENDING: 1, Verification.VERIFIED: 2}


@dataclass(frozen=True)
class Listing:
    """A live advert and what this node has learned about it."""

    advert: Advert
    verification: Verification
    verification_reason: str
    received_at: float
    evidence_since_seq: int  # first seq that carried the current evidence and keys
    signed: bytes = b""  # the advert as received, so it can be passed on unchanged

    @property
    def peer_id(self) -> str:
        return self.advert.peer_id

    @property
    def verified(self) -> bool:
        return self.verification is Verification.VERIFIED


@dataclass(frozen=True)
class Provider:
    """One peer offering one model: what the router needs to rank it."""

    listing: Listing
    offer: ModelOffer

    @property
    def advert(self) -> Advert:
        return self.listing.advert

    @property
    def peer_id(self) -> str:
        return self.listing.advert.peer_id


@dataclass(frozen=True)
class ModelSummary:
    id: str
    name: str
    quant: str
    ctx: int
    providers: int
    verified_providers: int
    min_price_prompt_per_1k: int
    min_price_completion_per_1k: int
    chat_format: str = ""


@dataclass(frozen=True)
class InsertResult:
    accepted: bool
    reason: RejectReason | None = None
    message: str = ""
    listing: Listing | None = None
    # True when the attestation evidence or keys are new for this peer: the shell should
    # verify them and call ``Directory.set_verification``.
    needs_verification: bool = False
    evicted: str | None = None  # peer id dropped to make room, if any


@dataclass
class _TokenBucket:
    tokens: float
    updated_at: float

    def refill(self, now: float, rate: float = RATE_PER_S, burst: float = RATE_BURST) -> None:
        # max(): a caller's clock stepping backwards must not mint or burn tokens.
        elapsed = max(0.0, now - self.updated_at)
        self.tokens = min(burst, self.tokens + elapsed * rate)
        self.updated_at = max(self.updated_at, now)

    def take(self, now: float, rate: float = RATE_PER_S, burst: float = RATE_BURST) -> bool:
        self.refill(now, rate, burst)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


AdvertDecoder = Callable[[bytes, float], Advert]
"""``decode_and_verify``'s shape: the advert in the bytes at a time, or AdvertRejected."""


@dataclass(frozen=True)
class AttestVerdict:
    """An attestation check's answer: VERIFIED, FAILED, or PENDING when it cannot decide
    offline (e.g. collateral not cached yet)."""

    verification: Verification
    reason: str


AttestCheck = Callable[[Advert, float], AttestVerdict]
"""Checks an advert's evidence against the attestation policy at a time (blocking)."""


@dataclass
class Directory:
    max_entries: int = DEFAULT_MAX_ENTRIES
    # A node keeps the default. The routing lab feeds one advert to many directories and
    # passes a decoder that verifies each distinct advert once (meshnode.lab.gossip).
    decode: AdvertDecoder = field(default=decode_and_verify, repr=False, compare=False)
    # When set, new evidence is checked before an advert is stored or evicts anything.
    attest: AttestCheck | None = field(default=None, repr=False, compare=False)
    # A node keeps the defaults; the routing lab varies them (what-if experiments).
    rate_per_s: float = RATE_PER_S
    rate_burst: float = RATE_BURST
    attest_checks: int = 0  # how many times ``attest`` ran (each is a signature check or more)
    accepted: int = 0
    rejections: Counter[RejectReason] = field(default_factory=Counter)
    evictions: int = 0
    _entries: dict[str, Listing] = field(default_factory=dict)
    _buckets: dict[str, _TokenBucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {self.max_entries}")
        if not (self.rate_per_s > 0 and self.rate_burst >= 1):
            raise ValueError(f"rate limit {self.rate_per_s}/s, burst {self.rate_burst} "
                             "must be > 0/s with a burst of at least 1")

    def __len__(self) -> int:
        return len(self._entries)

    # ------------------------------------------------------------------------ inserts

    def _reject(self, reason: RejectReason, message: str) -> InsertResult:
        self.rejections[reason] += 1
        return InsertResult(accepted=False, reason=reason, message=message)

    def insert(self, data: bytes, now: float) -> InsertResult:
        """Check ``data`` as an advert and keep it if it passes; never raises on bad input."""
        try:
            advert = self.decode(data, now)
        except AdvertRejected as e:
            return self._reject(e.reason, e.msg)

        current = self._entries.get(advert.peer_id)
        if current is not None and advert.seq <= current.advert.seq:
            return self._reject(
                RejectReason.STALE_SEQ,
                f"seq {advert.seq} is not newer than the {current.advert.seq} already held",
            )
        bucket = self._buckets.get(advert.peer_id)
        if bucket is None:
            bucket = _TokenBucket(tokens=self.rate_burst, updated_at=now)
        if not bucket.take(now, self.rate_per_s, self.rate_burst):
            self._buckets[advert.peer_id] = bucket
            return self._reject(
                RejectReason.RATE_LIMITED, f"{advert.peer_id} sends adverts too often"
            )

        same_evidence = current is not None and (
            current.advert.attestation == advert.attestation
            and current.advert.job_pubkey == advert.job_pubkey
        )
        if current is not None and same_evidence:
            verification = current.verification
            reason = current.verification_reason
            evidence_since = current.evidence_since_seq
        else:
            verification, reason = Verification.PENDING, "attestation not checked yet"
            evidence_since = advert.seq
            if self.attest is not None:
                self.attest_checks += 1
                verdict = self.attest(advert, now)
                verification = verdict.verification
                reason = verdict.reason[:MAX_VERIFICATION_REASON_LEN]

        evicted: str | None = None
        if current is None and len(self._entries) >= self.max_entries:
            evicted = self._make_room(verification, now)
            if evicted is None:
                return self._reject(
                    RejectReason.DIRECTORY_FULL,
                    f"{self.max_entries} entries, none this {verification} advert may replace",
                )
        self._buckets[advert.peer_id] = bucket
        self._prune_buckets(now)

        listing = Listing(
            advert=advert,
            verification=verification,
            verification_reason=reason,
            received_at=now,
            evidence_since_seq=evidence_since,
            signed=data,
        )
        self._entries[advert.peer_id] = listing
        self.accepted += 1
        return InsertResult(
            accepted=True,
            listing=listing,
            needs_verification=verification is Verification.PENDING and not same_evidence,
            evicted=evicted,
        )

    def _make_room(self, newcomer: Verification, now: float) -> str | None:
        """Evict one entry per the module's policy; the evicted peer id, or None."""
        expired = [pid for pid, e in self._entries.items() if e.advert.expires_at <= now]
        if expired:
            victim = expired[0]
        else:
            rank = _TRUST_RANK[newcomer]
            lower = [e for e in self._entries.values() if _TRUST_RANK[e.verification] < rank]
            if not lower:
                return None
            victim = min(
                lower, key=lambda e: (_TRUST_RANK[e.verification], e.advert.expires_at)
            ).peer_id
        del self._entries[victim]
        self.evictions += 1
        return victim

    def _prune_buckets(self, now: float) -> None:
        limit = MAX_RATE_BUCKETS_PER_ENTRY * self.max_entries
        if len(self._buckets) <= limit:
            return
        # A full bucket of an absent peer is the same as no bucket: drop those first.
        for pid in list(self._buckets):
            bucket = self._buckets[pid]
            bucket.refill(now, self.rate_per_s, self.rate_burst)
            if pid not in self._entries and bucket.tokens >= self.rate_burst:
                del self._buckets[pid]
        if len(self._buckets) > limit:
            absent = [pid for pid in self._buckets if pid not in self._entries]
            absent.sort(key=lambda pid: self._buckets[pid].tokens, reverse=True)
            for pid in absent[: len(self._buckets) - limit]:
                del self._buckets[pid]

    def expire(self, now: float) -> list[str]:
        """Drop every entry that has expired at ``now``; the peer ids dropped."""
        gone = [pid for pid, e in self._entries.items() if e.advert.expires_at <= now]
        for pid in gone:
            del self._entries[pid]
        for pid in list(self._buckets):
            bucket = self._buckets[pid]
            bucket.refill(now, self.rate_per_s, self.rate_burst)
            if pid not in self._entries and bucket.tokens >= self.rate_burst:
                del self._buckets[pid]
        return gone

    def remove(self, peer_id: str) -> bool:
        """Forget a peer (e.g. banned by the operator); False if it was not listed."""
        return self._entries.pop(peer_id, None) is not None

    # ------------------------------------------------------------------ verification

    def set_verification(
        self, peer_id: str, ok: bool, reason: str, *, seq: int | None = None
    ) -> bool:
        """Record the attestation verdict for a peer's current evidence.

        ``seq`` is the advert seq whose evidence was checked: the verdict is dropped if
        the peer has since published different evidence (a verdict about old evidence
        must not vouch for new evidence). Returns whether the verdict was applied.
        """
        current = self._entries.get(peer_id)
        if current is None:
            return False
        if seq is not None and seq < current.evidence_since_seq:
            return False
        self._entries[peer_id] = Listing(
            advert=current.advert,
            verification=Verification.VERIFIED if ok else Verification.FAILED,
            verification_reason=reason[:MAX_VERIFICATION_REASON_LEN],
            received_at=current.received_at,
            evidence_since_seq=current.evidence_since_seq,
            signed=current.signed,
        )
        return True

    def pending_verification(self, now: float) -> list[Listing]:
        return [e for e in self._live(now) if e.verification is Verification.PENDING]

    # ------------------------------------------------------------------------ queries

    def _live(self, now: float) -> list[Listing]:
        return [e for e in self._entries.values() if e.advert.expires_at > now]

    def get(self, peer_id: str, now: float) -> Listing | None:
        entry = self._entries.get(peer_id)
        if entry is None or entry.advert.expires_at <= now:
            return None
        return entry

    def peers(self, now: float) -> list[Listing]:
        """Every live listing, verified or not, ordered by peer id."""
        return sorted(self._live(now), key=lambda e: e.peer_id)

    def providers_for(self, model: str, now: float) -> list[Provider]:
        """Live providers of ``model`` (sha256 id, or exact name) whose engine is up,
        ordered by peer id."""
        found = []
        for listing in self.peers(now):
            offer = listing.advert.offer_for(model)
            if offer is not None and offer.available:
                found.append(Provider(listing=listing, offer=offer))
        return found

    def models(self, now: float) -> list[ModelSummary]:
        """One summary per model id on offer, ordered by name then id."""
        by_id: dict[str, list[tuple[Listing, ModelOffer]]] = {}
        for listing in self._live(now):
            for offer in listing.advert.models:
                by_id.setdefault(offer.id, []).append((listing, offer))
        summaries = []
        for model_id, offers in by_id.items():
            first = offers[0][1]
            summaries.append(
                ModelSummary(
                    id=model_id,
                    name=first.name,
                    quant=first.quant,
                    ctx=min(o.ctx for _, o in offers),
                    providers=len(offers),
                    verified_providers=sum(1 for listing, _ in offers if listing.verified),
                    min_price_prompt_per_1k=min(o.price_prompt_per_1k for _, o in offers),
                    min_price_completion_per_1k=min(o.price_completion_per_1k for _, o in offers),
                    chat_format=first.chat_format,
                )
            )
        return sorted(summaries, key=lambda s: (s.name, s.id))

    def counters(self) -> dict[str, int]:
        """Accepted, evicted and per-reason rejection counts, for metrics and logs."""
        out = {"accepted": self.accepted, "evicted": self.evictions}
        out.update({reason.value: self.rejections[reason] for reason in RejectReason})
        return out
