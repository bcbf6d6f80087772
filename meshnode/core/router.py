"""Choosing a provider for a job: candidate filtering, scoring and pluggable strategies.

The score of a candidate is the client's expected seconds until the job is finished,
plus what the job costs converted to seconds, plus a failure penalty that decays::

    score = rtt + ahead × mean_job_time / slots + generation_time
          + price_weight × cost + failure_penalty(now)

``Router.choose`` returns every eligible candidate, best first: the shell tries the
first and falls back down the list (before the first token, or to continue a stream
that broke). The same code runs in the node and in ``bench/routing_sim.py``.

Exploration: a provider this client has never run a job on is *unexplored*. It has only
its advert, which says 0 tok/s if it never ran a job, and may lie. Two rules:

- **Capped optimistic prior.** Its speed is the median speed this client measured among
  the other candidates when the advert says nothing, and never more than the best speed
  measured among them whatever the advert claims (its RTT: their median RTT). It scores
  like a typical measured provider, and a lying advert can at best tie the best one.
- **One probe, bounded share.** With p2c (the default), an unexplored provider whose
  prior score is within ``P2C_SCORE_CUTOFF`` of the best explored one is tried first, one
  job at a time (``MAX_UNMEASURED_INFLIGHT``), while probes stay under
  ``MAX_PROBE_SHARE`` of this client's jobs; otherwise unexplored providers are only
  fallbacks. After its probe a provider's own measurement replaces the prior.

Why not UCB or ε-greedy: both keep spending jobs on providers already measured, and
ε needs a decay schedule. Here a single measurement replaces the prior completely, so one
probe per provider is the whole cost, and the share cap bounds what a flood of new (or
Sybil) peers can take. A provider whose advert lied loses its traffic after that probe.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from meshnode.core.directory import Provider

# Unknown peers get a typical cross-region RTT: neither favoured over measured nearby
# peers nor shunned, so new providers get tried.
DEFAULT_RTT_S = 0.15
RTT_EWMA_ALPHA = 0.2  # ~ the last 5 samples: smooths jitter, follows a route change quickly
JOB_EWMA_ALPHA = 0.3  # job times vary more with prompt size; weight recent jobs a bit more
# llama.cpp evaluates the prompt in batches, roughly an order of magnitude faster than it
# decodes; used only when nothing better is known.
PROMPT_SPEEDUP = 10.0
MIN_TOKENS_PER_S = 0.1  # floor for advertised/measured speed, so a 0 never divides
# A failure costs the client a timeout and a retry; 30 s makes a failing provider lose
# to any working one of similar speed until it has decayed for a few half-lives.
FAILURE_PENALTY_S = 30.0
# Two minutes: stops hammering a provider that is down, yet a restarted one gets traffic
# back within about ten minutes.
PENALTY_HALF_LIFE_S = 120.0
MAX_PENALTY_S = 600.0  # repeated failures saturate here, so recovery time stays bounded
# A client trades one second of waiting for 0.01 TON saved: price matters only between
# providers of similar speed unless the caller raises the weight.
DEFAULT_PRICE_WEIGHT_S_PER_NANOTON = 1.0 / 10_000_000
# Power of two choices samples only among candidates expected to finish within this
# factor of the best one: with providers of very different speeds, plain p2c sends a
# fixed 1/C(n,2) share to the two slowest whatever their queues, which overloads them.
P2C_SCORE_CUTOFF = 2.0
# Jobs in flight from this client to an unexplored provider while it may still be tried
# first: one probe measures it; more would bet traffic on an advert nobody has checked.
MAX_UNMEASURED_INFLIGHT = 1
# At most one job in five goes to a provider nobody measured: a flood of new (or Sybil)
# peers cannot take more, while a single new provider still gets its probe at once.
MAX_PROBE_SHARE = 0.2
MAX_TRACKED_PEERS = 4096  # 4x the directory's default cap: stats outlive brief absences
STATS_FORMAT_VERSION = 1  # bump when PeerStats' persisted fields change


class Strategy(StrEnum):
    RANDOM = "random"
    ROUND_ROBIN = "round_robin"
    LEAST_LOADED = "least_loaded"
    POWER_OF_TWO = "p2c"  # latency-aware power of two choices: the default
    CHEAPEST = "cheapest"
    FASTEST = "fastest"  # greedy lowest score; herds onto one provider on stale loads


class StatsFormatError(ValueError):
    """Persisted router statistics are not in the expected shape."""


@dataclass(frozen=True)
class Candidate:
    """A provider of one model, as the router sees it."""

    peer_id: str
    model_id: str
    price_prompt_per_1k: int  # nanoton
    price_completion_per_1k: int  # nanoton
    slots: int
    busy_slots: int
    queue_len: int
    tokens_per_s: float  # advertised
    verified: bool

    @classmethod
    def from_provider(cls, provider: Provider) -> Candidate:
        advert = provider.advert
        return cls(
            peer_id=advert.peer_id,
            model_id=provider.offer.id,
            price_prompt_per_1k=provider.offer.price_prompt_per_1k,
            price_completion_per_1k=provider.offer.price_completion_per_1k,
            slots=advert.capacity.slots,
            busy_slots=advert.load.busy_slots,
            queue_len=advert.load.queue_len,
            tokens_per_s=advert.capacity.tokens_per_s,
            verified=provider.listing.verified,
        )


@dataclass(frozen=True)
class Reference:
    """What this client measured among a pool's explored providers: the prior for the
    unexplored ones (module docstring)."""

    median_tokens_per_s: float
    best_tokens_per_s: float
    median_rtt_s: float | None


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


@dataclass(frozen=True)
class JobEstimate:
    model_id: str
    prompt_tokens: int
    completion_tokens: int  # max_tokens, or a better guess if the caller has one
    max_price_prompt_per_1k: int | None = None  # nanoton; None = no cap
    max_price_completion_per_1k: int | None = None

    def cost_nanoton(self, c: Candidate) -> float:
        return (
            self.prompt_tokens * c.price_prompt_per_1k
            + self.completion_tokens * c.price_completion_per_1k
        ) / 1000.0


def _ewma(old: float | None, sample: float, alpha: float) -> float:
    return sample if old is None else old + alpha * (sample - old)


def _check_sample(name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value}")


_FLOAT_FIELDS = ("rtt_s", "job_time_s", "tokens_per_s")
_REQUIRED_FIELDS = ("penalty_s", "penalty_at", "successes", "failures", "last_seen")


@dataclass
class PeerStats:
    """What this client has measured about one provider."""

    rtt_s: float | None = None  # EWMA of latency samples
    job_time_s: float | None = None  # EWMA of whole-job durations
    tokens_per_s: float | None = None  # EWMA of measured decode speed
    penalty_s: float = 0.0  # failure penalty as of penalty_at
    penalty_at: float = 0.0
    successes: int = 0
    failures: int = 0
    last_seen: float = 0.0
    inflight: int = 0  # jobs this client has running there; not persisted

    @property
    def explored(self) -> bool:
        """Whether a job of this client ever ended there (success or failure)."""
        return self.successes > 0 or self.failures > 0

    def penalty(self, now: float) -> float:
        """The failure penalty at ``now``, halving every PENALTY_HALF_LIFE_S."""
        if self.penalty_s == 0.0:
            return 0.0
        elapsed = max(0.0, now - self.penalty_at)
        return self.penalty_s * math.pow(0.5, elapsed / PENALTY_HALF_LIFE_S)

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "rtt_s": self.rtt_s,
            "job_time_s": self.job_time_s,
            "tokens_per_s": self.tokens_per_s,
            "penalty_s": self.penalty_s,
            "penalty_at": self.penalty_at,
            "successes": self.successes,
            "failures": self.failures,
            "last_seen": self.last_seen,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PeerStats:
        if not isinstance(data, Mapping):
            raise StatsFormatError("peer stats must be a mapping")
        unknown = set(data) - set(_FLOAT_FIELDS) - set(_REQUIRED_FIELDS)
        if unknown:
            raise StatsFormatError(f"unknown peer stats fields {sorted(unknown)}")
        for name in _REQUIRED_FIELDS:
            if name not in data:
                raise StatsFormatError(f"peer stats lack {name!r}")
        for name in (*_FLOAT_FIELDS, *_REQUIRED_FIELDS):
            value = data.get(name)
            if value is None and name in _FLOAT_FIELDS:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise StatsFormatError(f"peer stats {name!r} must be a number")
            if not math.isfinite(value) or value < 0:
                raise StatsFormatError(f"peer stats {name!r}={value} must be finite, >= 0")
        for name in ("successes", "failures"):
            if not isinstance(data[name], int):
                raise StatsFormatError(f"peer stats {name!r} must be an integer")

        def opt(name: str) -> float | None:
            value = data.get(name)
            return None if value is None else float(value)

        return cls(
            rtt_s=opt("rtt_s"),
            job_time_s=opt("job_time_s"),
            tokens_per_s=opt("tokens_per_s"),
            penalty_s=min(float(data["penalty_s"]), MAX_PENALTY_S),
            penalty_at=float(data["penalty_at"]),
            successes=int(data["successes"]),
            failures=int(data["failures"]),
            last_seen=float(data["last_seen"]),
        )


@dataclass
class Router:
    """Ranks candidates for a job and learns from how jobs went.

    ``seed`` makes random choices reproducible (tests, the simulator); a node passes
    None. ``allow_unverified`` admits providers whose attestation is not verified: only
    for development with the explicit insecure flag.
    """

    strategy: Strategy = Strategy.POWER_OF_TWO
    seed: int | None = None
    price_weight_s_per_nanoton: float = DEFAULT_PRICE_WEIGHT_S_PER_NANOTON
    allow_unverified: bool = False
    _rng: random.Random = field(init=False, repr=False)
    _stats: dict[str, PeerStats] = field(default_factory=dict, init=False, repr=False)
    _rr_next: int = field(default=0, init=False, repr=False)
    _started: int = field(default=0, init=False, repr=False)
    _probes: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        self.strategy = Strategy(self.strategy)
        _check_sample("price weight", self.price_weight_s_per_nanoton)
        self._rng = random.Random(self.seed)

    # --------------------------------------------------------------------- choosing

    def eligible(self, candidates: Sequence[Candidate], job: JobEstimate) -> list[Candidate]:
        """Candidates serving the job's model, within its price caps, and verified
        (unless ``allow_unverified``), in peer-id order with duplicates dropped."""
        seen: set[str] = set()
        out = []
        for c in sorted(candidates, key=lambda c: c.peer_id):
            if c.peer_id in seen or c.model_id != job.model_id:
                continue
            if not (c.verified or self.allow_unverified):
                continue
            cap_p, cap_c = job.max_price_prompt_per_1k, job.max_price_completion_per_1k
            if cap_p is not None and c.price_prompt_per_1k > cap_p:
                continue
            if cap_c is not None and c.price_completion_per_1k > cap_c:
                continue
            seen.add(c.peer_id)
            out.append(c)
        return out

    def explored(self, peer_id: str) -> bool:
        stats = self._stats.get(peer_id)
        return stats is not None and stats.explored

    def reference(self, candidates: Sequence[Candidate]) -> Reference | None:
        """The prior for ``candidates`` this client has not explored; None when it
        measured the speed of none of them."""
        measured = [s for c in candidates if (s := self._stats.get(c.peer_id)) is not None]
        speeds = [s.tokens_per_s for s in measured if s.tokens_per_s is not None]
        if not speeds:
            return None
        rtts = [s.rtt_s for s in measured if s.rtt_s is not None]
        return Reference(_median(speeds), max(speeds), _median(rtts) if rtts else None)

    def speed(self, c: Candidate, reference: Reference | None = None) -> float:
        """Tokens per second to expect: measured, else the capped prior."""
        stats = self._stats.get(c.peer_id)
        if stats is not None and stats.tokens_per_s is not None:
            return max(MIN_TOKENS_PER_S, stats.tokens_per_s)
        if reference is None:
            return max(MIN_TOKENS_PER_S, c.tokens_per_s)
        claimed = c.tokens_per_s if c.tokens_per_s > 0 else reference.median_tokens_per_s
        return max(MIN_TOKENS_PER_S, min(claimed, reference.best_tokens_per_s))

    def expected_finish_s(
        self, c: Candidate, job: JobEstimate, reference: Reference | None = None
    ) -> float:
        """Expected seconds from sending the job to its last token."""
        stats = self._stats.get(c.peer_id, PeerStats())
        rtt = stats.rtt_s
        if rtt is None:
            known = reference.median_rtt_s if reference is not None else None
            rtt = DEFAULT_RTT_S if known is None else known
        speed = self.speed(c, reference)
        generation = job.completion_tokens / speed + job.prompt_tokens / (speed * PROMPT_SPEEDUP)
        mean_job = generation if stats.job_time_s is None else stats.job_time_s
        slots = max(1, c.slots)
        ahead = max(0, c.busy_slots + c.queue_len + stats.inflight - slots + 1)
        return rtt + ahead * mean_job / slots + generation

    def score(
        self, c: Candidate, job: JobEstimate, now: float, reference: Reference | None = None
    ) -> float:
        """Lower is better: expected finish + price weight × cost + failure penalty.
        ``reference`` is ``self.reference(pool)`` of the pool ``c`` is ranked in."""
        penalty = self._stats[c.peer_id].penalty(now) if c.peer_id in self._stats else 0.0
        return (
            self.expected_finish_s(c, job, reference)
            + self.price_weight_s_per_nanoton * job.cost_nanoton(c)
            + penalty
        )

    def choose(
        self, candidates: Sequence[Candidate], job: JobEstimate, now: float
    ) -> list[Candidate]:
        """Eligible candidates ordered first choice, then fallbacks; empty if none."""
        pool = self.eligible(candidates, job)
        if not pool:
            return []
        reference = self.reference(pool)

        def by_score(c: Candidate) -> float:
            return self.score(c, job, now, reference)

        if self.strategy is Strategy.POWER_OF_TWO:
            explored = [c for c in pool if self.explored(c.peer_id)]
            if explored and len(explored) < len(pool):
                return self._explore(pool, explored, job, by_score)
        return self._rank(pool, job, by_score)

    def _explore(
        self,
        pool: list[Candidate],
        explored: list[Candidate],
        job: JobEstimate,
        by_score: Callable[[Candidate], float],
    ) -> list[Candidate]:
        """p2c among the explored candidates, after the one probe that is due (if any);
        the other unexplored ones are fallbacks (module docstring)."""
        fresh = sorted((c for c in pool if c not in explored), key=by_score)
        best = min(by_score(c) for c in explored)
        due = self._probes < MAX_PROBE_SHARE * self._started + 1
        probe = next(
            (c for c in fresh
             if due and not self._probing(c.peer_id) and by_score(c) <= best * P2C_SCORE_CUTOFF),
            None,
        )
        first = [probe] if probe is not None else []
        return [*first, *self._rank(explored, job, by_score),
                *(c for c in fresh if c is not probe)]

    def _probing(self, peer_id: str) -> bool:
        """An unexplored provider with its probe job already in flight."""
        stats = self._stats.get(peer_id)
        return (
            stats is not None
            and not stats.explored
            and stats.inflight >= MAX_UNMEASURED_INFLIGHT
        )

    def _rank(
        self, pool: list[Candidate], job: JobEstimate, by_score: Callable[[Candidate], float]
    ) -> list[Candidate]:
        if self.strategy is Strategy.RANDOM:
            self._rng.shuffle(pool)
            return pool
        if self.strategy is Strategy.ROUND_ROBIN:
            start = self._rr_next % len(pool)
            self._rr_next += 1
            return pool[start:] + pool[:start]
        if self.strategy is Strategy.FASTEST:
            return sorted(pool, key=by_score)
        if self.strategy is Strategy.CHEAPEST:
            return sorted(pool, key=lambda c: (job.cost_nanoton(c), by_score(c)))
        if self.strategy is Strategy.LEAST_LOADED:
            return sorted(pool, key=lambda c: (self._load_fraction(c), by_score(c)))
        return self._power_of_two(pool, by_score)

    def _load_fraction(self, c: Candidate) -> float:
        inflight = self._stats[c.peer_id].inflight if c.peer_id in self._stats else 0
        return (c.busy_slots + c.queue_len + inflight) / max(1, c.slots)

    def _power_of_two(
        self, pool: list[Candidate], by_score: Callable[[Candidate], float]
    ) -> list[Candidate]:
        # Two random candidates, keep the better: spreads load even when every client
        # sees the same stale adverts, where always taking the best would herd.
        ranked = sorted(pool, key=by_score)
        best = by_score(ranked[0])
        contenders = [c for c in ranked if by_score(c) <= best * P2C_SCORE_CUTOFF]
        if len(contenders) < 2:
            return ranked
        a, b = self._rng.sample(contenders, 2)
        first = a if by_score(a) <= by_score(b) else b
        return [first, *(c for c in ranked if c is not first)]

    # --------------------------------------------------------------------- learning

    def _peer(self, peer_id: str, now: float) -> PeerStats:
        stats = self._stats.get(peer_id)
        if stats is None:
            if len(self._stats) >= MAX_TRACKED_PEERS:
                self._forget_oldest()
            stats = self._stats[peer_id] = PeerStats()
        stats.last_seen = max(stats.last_seen, now)
        return stats

    def _forget_oldest(self) -> None:
        idle = [pid for pid, s in self._stats.items() if s.inflight == 0] or list(self._stats)
        del self._stats[min(idle, key=lambda pid: self._stats[pid].last_seen)]

    def record_rtt(self, peer_id: str, rtt_s: float, now: float) -> None:
        """A latency sample (ping, or a request/ack round trip of a job)."""
        _check_sample("rtt", rtt_s)
        stats = self._peer(peer_id, now)
        stats.rtt_s = _ewma(stats.rtt_s, rtt_s, RTT_EWMA_ALPHA)

    def record_start(self, peer_id: str, now: float) -> None:
        """A job was sent: counts against the provider's load until it ends."""
        stats = self._peer(peer_id, now)
        self._started += 1
        if not stats.explored:
            self._probes += 1
        stats.inflight += 1

    def record_success(
        self,
        peer_id: str,
        now: float,
        *,
        duration_s: float,
        completion_tokens: int,
        first_token_s: float | None = None,
        rtt_sample_s: float | None = None,
    ) -> None:
        """A job finished. ``first_token_s`` (send to first token) lets decode speed be
        measured apart from queueing and prompt time; ``rtt_sample_s`` is a latency
        sample taken during the job (e.g. the Open/ack round trip)."""
        _check_sample("duration", duration_s)
        stats = self._peer(peer_id, now)
        stats.inflight = max(0, stats.inflight - 1)
        stats.successes += 1
        stats.job_time_s = _ewma(stats.job_time_s, duration_s, JOB_EWMA_ALPHA)
        if first_token_s is not None and completion_tokens > 1:
            decode_s = duration_s - first_token_s
            if decode_s > 0:
                # n tokens arrive in n-1 decode intervals after the first one
                measured = (completion_tokens - 1) / decode_s
                stats.tokens_per_s = _ewma(stats.tokens_per_s, measured, JOB_EWMA_ALPHA)
        if rtt_sample_s is not None:
            self.record_rtt(peer_id, rtt_sample_s, now)

    def record_abandoned(self, peer_id: str, now: float) -> None:
        """A job ended in a way that says nothing about the provider (the request was
        invalid): it no longer counts as in flight, and nothing else changes."""
        stats = self._peer(peer_id, now)
        stats.inflight = max(0, stats.inflight - 1)

    def record_failure(self, peer_id: str, now: float) -> None:
        """A job failed (refused, timed out, broke mid-stream): add a decaying penalty."""
        stats = self._peer(peer_id, now)
        stats.inflight = max(0, stats.inflight - 1)
        stats.failures += 1
        stats.penalty_s = min(MAX_PENALTY_S, stats.penalty(now) + FAILURE_PENALTY_S)
        stats.penalty_at = now

    # ------------------------------------------------------------------- persistence

    def stats(self, peer_id: str) -> PeerStats:
        """A copy of what is known about ``peer_id`` (defaults if nothing)."""
        s = self._stats.get(peer_id)
        return PeerStats() if s is None else PeerStats(**vars(s))

    def export_stats(self) -> dict[str, Any]:
        """Plain data (JSON/msgpack-able) for the shell to persist across restarts."""
        return {
            "version": STATS_FORMAT_VERSION,
            "peers": {pid: s.to_dict() for pid, s in self._stats.items()},
        }

    def import_stats(self, data: Mapping[str, Any]) -> None:
        """Replace all statistics with persisted ones; ``StatsFormatError`` if malformed
        (nothing is changed then)."""
        if not isinstance(data, Mapping) or data.get("version") != STATS_FORMAT_VERSION:
            raise StatsFormatError(f"router stats must be version {STATS_FORMAT_VERSION}")
        peers = data.get("peers")
        if not isinstance(peers, Mapping):
            raise StatsFormatError("router stats lack a 'peers' mapping")
        if len(peers) > MAX_TRACKED_PEERS:
            raise StatsFormatError(f"{len(peers)} peers, limit {MAX_TRACKED_PEERS}")
        loaded = {}
        for pid, raw in peers.items():
            if not isinstance(pid, str):
                raise StatsFormatError("peer ids in router stats must be strings")
            loaded[pid] = PeerStats.from_dict(raw)
        self._stats = loaded
