"""Choosing a provider for a job: candidate filtering, scoring and pluggable strategies.

The score of a candidate is the client's expected seconds until the job is finished,
plus what the job costs converted to seconds, plus a failure penalty that decays::

    score = rtt + ahead × mean_job_time / slots + generation_time
          + price_weight × cost + failure_penalty(now)

A provider that could not be reached (``record_unreachable``: dial failed, or the
connection dropped before the first token) also *cools down*: for UNREACHABLE_COOLDOWN_S,
doubling on repeats, it is ranked after every other eligible candidate whatever its
score; a success or a newer advert (``note_advert``) ends that.

``Router.choose`` returns every eligible candidate, best first: the shell tries the
first and falls back down the list (before the first token, or to continue a stream
that broke). ``Router.rank`` does the same over a ``CandidateTable`` and can stop after
the first few; ``choose`` is ``rank`` over a table built from its list. Scores are
computed for all rows at once with numpy: the same code runs in the node and in the
routing lab (``meshnode.lab``) at 10,000 providers.

Exploration: a provider this client has never run a job on is *unexplored*. It has only
its advert, which says 0 tok/s if it never ran a job, and may lie. Two rules:

- **Capped optimistic prior.** Its speed is the median speed this client measured among
  the other candidates when the advert says nothing, and never more than the best speed
  measured among them whatever the advert claims (its RTT: their median RTT). It scores
  like a typical measured provider, and a lying advert can at best tie the best one.
- **One probe, bounded share.** With p2c (the default), one unexplored provider whose
  prior score is within ``P2C_SCORE_CUTOFF`` of the best explored one is tried first, one
  job at a time (``MAX_UNMEASURED_INFLIGHT``), while probes stay under
  ``MAX_PROBE_SHARE`` of this client's jobs; otherwise unexplored providers are only
  fallbacks. After its probe a provider's own measurement replaces the prior. Which
  one: the better of two drawn at random among those within the cut-off, not the best
  of all, since clients that share a directory see the same adverts and would all probe
  the same provider (in the routing lab that filled its queue and failed jobs). The
  better of two rather than any one: in the lab's 10k mesh at load 0.7, p99 11.55 s and
  27 failed jobs against 12.01 s and 40 for a uniform draw.

Why not UCB or ε-greedy: both keep spending jobs on providers already measured, and
ε needs a decay schedule. Here a single measurement replaces the prior completely, so one
probe per provider is the whole cost, and the share cap bounds what a flood of new (or
Sybil) peers can take. A provider whose advert lied loses its traffic after that probe.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from meshnode.core.candidates import Candidate, CandidateTable, Floats, Ints, JobEstimate

__all__ = ["Candidate", "CandidateTable", "JobEstimate", "Reference", "Router", "Strategy"]

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
# A provider that could not be dialled, or dropped a job before its first token, is most
# likely down: skip it for 30 s (a restart takes seconds; an advert lives minutes), so each
# job does not burn an attempt on it until its advert expires. The penalty alone does not
# do this: 30 s of score loses to nothing when the others are busy or slower.
UNREACHABLE_COOLDOWN_S = 30.0
# Repeated unreachability doubles the cooldown up to this: a provider gone for good costs
# one attempt per 8 minutes, and a returning one is tried again within that.
MAX_UNREACHABLE_COOLDOWN_S = 480.0
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
ROUND_ROBIN_START_RANGE = 1 << 30  # any start will do: it is taken modulo the pool size
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
    # Skipped while others are eligible until cooling_until (not persisted: a restarted
    # client tries again); cooldown_s is the length of the last one, doubled on repeats.
    cooling_until: float = 0.0
    cooldown_s: float = 0.0
    advert_seq: int = -1  # highest advert seq seen; a higher one ends the cooldown

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


@dataclass(frozen=True)
class Reference:
    """What this client measured among a pool's explored providers: the prior for the
    unexplored ones (module docstring)."""

    median_tokens_per_s: float
    best_tokens_per_s: float
    median_rtt_s: float | None

    @classmethod
    def of(cls, speeds: list[float], rtts: list[float]) -> Reference | None:
        """From measured speeds and RTTs; None when no speed was measured."""
        if not speeds:
            return None
        return cls(_median(speeds), max(speeds), _median(rtts) if rtts else None)


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _smallest(key: Floats, want: int) -> Ints:
    """Positions of the ``want`` smallest keys, ascending; ties in position order (a
    stable sort's prefix, found in linear time when ``want`` is small)."""
    n = len(key)
    if want >= n:
        return np.argsort(key, kind="stable")
    if want <= 0:
        return np.zeros(0, dtype=np.int64)
    kth = np.partition(key, want - 1)[want - 1]
    below = np.flatnonzero(key < kth)
    tied = np.flatnonzero(key == kth)[: want - len(below)]
    chosen = np.sort(np.concatenate((below, tied)))
    return chosen[np.argsort(key[chosen], kind="stable")]


def _smallest_by(primary: Floats, secondary: Floats, want: int) -> Ints:
    """Positions of the ``want`` smallest (primary, secondary) pairs, ties in position
    order. With a small ``want`` only the rows that can reach the prefix are sorted:
    those below the want-th primary value, and of those tied at it, the ones with the
    smallest secondary (thousands of idle providers tie at load 0)."""
    n = len(primary)
    if want <= 0:
        return np.zeros(0, dtype=np.int64)
    if want >= n:
        return np.lexsort((secondary, primary))
    kth = np.partition(primary, want - 1)[want - 1]
    below = np.flatnonzero(primary < kth)
    tied = np.flatnonzero(primary == kth)
    picked = tied[_smallest(secondary[tied], want - len(below))]
    chosen = np.sort(np.concatenate((below, picked)))
    order: Ints = chosen[np.lexsort((secondary[chosen], primary[chosen]))]
    return order


@dataclass
class _Columns:
    """Score inputs for the rows being ranked (the eligible rows). Advertised values
    come from the table; what this client measured overrides them at a few positions
    (``*_at`` are positions, the arrays beside them the values), so a 10,000-row table
    costs one pass of array arithmetic plus one step per peer the client knows."""

    sel: Ints | slice  # eligible rows: a slice when every row is eligible
    count: int
    rtt_at: Ints
    rtt: Floats
    speed_at: Ints
    speed: Floats
    job_time_at: Ints
    job_time: Floats
    inflight_at: Ints
    inflight: Floats
    penalty_at: Ints
    penalty: Floats
    explored_at: Ints  # rows this client ran a job on (``PeerStats.explored``)
    probing_at: Ints  # unexplored rows with their probe job in flight
    reference: Reference | None  # the prior for the unexplored rows


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
    # A node keeps the defaults; the routing lab varies them (what-if experiments).
    p2c_score_cutoff: float = P2C_SCORE_CUTOFF
    max_probe_share: float = MAX_PROBE_SHARE
    # False: the probe goes to the best-scored unexplored provider, the same one for
    # every client of a city, which herds (routing lab); kept for what-if runs only.
    spread_probes: bool = True
    _rng: np.random.Generator = field(init=False, repr=False)
    _stats: dict[str, PeerStats] = field(default_factory=dict, init=False, repr=False)
    _rr_next: int = field(default=0, init=False, repr=False)
    _started: int = field(default=0, init=False, repr=False)  # jobs sent
    _probes: int = field(default=0, init=False, repr=False)  # of them, to unexplored peers

    def __post_init__(self) -> None:
        self.strategy = Strategy(self.strategy)
        _check_sample("price weight", self.price_weight_s_per_nanoton)
        if not (math.isfinite(self.p2c_score_cutoff) and self.p2c_score_cutoff >= 1.0):
            raise ValueError(f"p2c score cutoff must be >= 1, got {self.p2c_score_cutoff}")
        if not 0.0 <= self.max_probe_share <= 1.0:
            raise ValueError(f"probe share must be within [0, 1], got {self.max_probe_share}")
        self._rng = np.random.default_rng(self.seed)
        if self.strategy is Strategy.ROUND_ROBIN:
            # A random start: clients that list the same providers in the same order
            # would otherwise walk them in lockstep (routing lab: most jobs found queues full).
            self._rr_next = int(self._rng.integers(ROUND_ROBIN_START_RANGE))

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

    def _eligible_rows(
        self, table: CandidateTable, job: JobEstimate, now: float, exclude: Collection[str]
    ) -> Ints:
        """The same rules as ``eligible`` (plus advert expiry), as a mask over a table."""
        n = len(table)
        code = table.model_code(job.model_id)
        if code is None or n == 0:
            return np.zeros(0, dtype=np.int64)
        ok = (table.model[:n] == code) & (table.expires_at[:n] > now)
        if not self.allow_unverified:
            ok &= table.verified[:n]
        if job.max_price_prompt_per_1k is not None:
            ok &= table.price_prompt[:n] <= job.max_price_prompt_per_1k
        if job.max_price_completion_per_1k is not None:
            ok &= table.price_completion[:n] <= job.max_price_completion_per_1k
        for peer_id in exclude:
            row = table.row_of(peer_id)
            if row is not None:
                ok[row] = False
        return np.flatnonzero(ok)

    def _columns(self, table: CandidateTable, rows: Ints, now: float) -> _Columns:
        """Score inputs for ``rows``: advertised values, overridden by what this client
        measured. Only the peers it has statistics for are visited one by one."""
        k = len(rows)
        whole = k == len(table)  # rows are sorted: all of them means rows == arange(k)
        sel: Ints | slice = slice(0, k) if whole else rows
        over: dict[str, tuple[list[int], list[float]]] = {
            name: ([], []) for name in ("rtt", "speed", "job_time", "inflight", "penalty")
        }
        explored: list[int] = []
        probing: list[int] = []
        if self._stats:
            if not whole:
                position = np.full(len(table), -1, dtype=np.int64)
                position[rows] = np.arange(k)
            for peer_id, stats in self._stats.items():
                row = table.row_of(peer_id)
                if row is None:
                    continue
                i = row if whole else int(position[row])
                if i < 0:
                    continue
                for name, value in (("rtt", stats.rtt_s), ("speed", stats.tokens_per_s),
                                    ("job_time", stats.job_time_s)):
                    if value is not None:
                        over[name][0].append(i)
                        over[name][1].append(value)
                if stats.inflight:
                    over["inflight"][0].append(i)
                    over["inflight"][1].append(float(stats.inflight))
                penalty = stats.penalty(now)
                if penalty:
                    over["penalty"][0].append(i)
                    over["penalty"][1].append(penalty)
                if stats.explored:
                    explored.append(i)
                elif stats.inflight >= MAX_UNMEASURED_INFLIGHT:
                    probing.append(i)

        def at(name: str) -> Ints:
            return np.asarray(over[name][0], dtype=np.int64)

        def val(name: str) -> Floats:
            return np.asarray(over[name][1], dtype=np.float64)

        return _Columns(
            sel=sel, count=k,
            rtt_at=at("rtt"), rtt=val("rtt"),
            speed_at=at("speed"), speed=val("speed"),
            job_time_at=at("job_time"), job_time=val("job_time"),
            inflight_at=at("inflight"), inflight=val("inflight"),
            penalty_at=at("penalty"), penalty=val("penalty"),
            explored_at=np.asarray(sorted(explored), dtype=np.int64),
            probing_at=np.asarray(probing, dtype=np.int64),
            reference=Reference.of(over["speed"][1], over["rtt"][1]),
        )  # fmt: skip

    def _load(self, table: CandidateTable, cols: _Columns) -> Floats:
        """Jobs at each row: advertised busy + queued, plus this client's in flight."""
        load: Floats = table.busy[cols.sel] + table.queue[cols.sel]
        if len(cols.inflight_at):
            load[cols.inflight_at] += cols.inflight
        return load

    def _speed(self, table: CandidateTable, cols: _Columns) -> Floats:
        """Tokens per second to expect at each row: measured, else the advert capped by
        the prior (module docstring), else the advert."""
        claimed = table.tokens_per_s[cols.sel]
        ref = cols.reference
        if ref is not None:
            claimed = np.where(claimed > 0, claimed, ref.median_tokens_per_s)
            claimed = np.minimum(claimed, ref.best_tokens_per_s)
        speed: Floats = np.maximum(MIN_TOKENS_PER_S, claimed)
        if len(cols.speed_at):
            speed[cols.speed_at] = np.maximum(MIN_TOKENS_PER_S, cols.speed)
        return speed

    def _finish(self, table: CandidateTable, cols: _Columns, job: JobEstimate) -> Floats:
        """Expected seconds from sending the job to its last token, per row::

            rtt + ahead × mean_job_time / slots + generation_time
        """
        speed = self._speed(table, cols)
        tokens = job.completion_tokens + job.prompt_tokens / PROMPT_SPEEDUP
        generation: Floats = tokens / speed
        mean_job = generation
        if len(cols.job_time_at):
            mean_job = generation.copy()
            mean_job[cols.job_time_at] = cols.job_time
        slots = np.maximum(1.0, table.slots[cols.sel])
        ahead = np.maximum(0.0, self._load(table, cols) - slots + 1)
        finish: Floats = ahead * mean_job / slots + generation
        ref = cols.reference
        unknown_rtt = DEFAULT_RTT_S
        if ref is not None and ref.median_rtt_s is not None:
            unknown_rtt = ref.median_rtt_s
        finish += unknown_rtt
        if len(cols.rtt_at):
            finish[cols.rtt_at] += cols.rtt - unknown_rtt
        return finish

    def _cost(self, table: CandidateTable, cols: _Columns, job: JobEstimate) -> Floats:
        cost: Floats = (
            job.prompt_tokens * table.price_prompt[cols.sel]
            + job.completion_tokens * table.price_completion[cols.sel]
        ) / 1000.0
        return cost

    def _score(self, table: CandidateTable, cols: _Columns, job: JobEstimate) -> Floats:
        score = self._finish(table, cols, job)
        if self.price_weight_s_per_nanoton:
            score += self.price_weight_s_per_nanoton * self._cost(table, cols, job)
        if len(cols.penalty_at):
            score[cols.penalty_at] += cols.penalty
        return score

    def _one(
        self, c: Candidate, now: float, reference: Reference | None
    ) -> tuple[CandidateTable, _Columns]:
        """A one-row table for ``c`` and its columns, ranked as if in a pool whose
        prior is ``reference``."""
        table = CandidateTable([c])
        cols = self._columns(table, np.zeros(1, dtype=np.int64), now)
        return table, dataclasses.replace(cols, reference=reference)

    def explored(self, peer_id: str) -> bool:
        stats = self._stats.get(peer_id)
        return stats is not None and stats.explored

    def reference(self, candidates: Sequence[Candidate]) -> Reference | None:
        """The prior for ``candidates`` this client has not explored; None when it
        measured the speed of none of them."""
        table = CandidateTable(candidates)
        return self._columns(table, np.arange(len(table), dtype=np.int64), 0.0).reference

    def speed(self, c: Candidate, reference: Reference | None = None) -> float:
        """Tokens per second to expect: measured, else the capped prior."""
        table, cols = self._one(c, 0.0, reference)
        return float(self._speed(table, cols)[0])

    def expected_finish_s(
        self, c: Candidate, job: JobEstimate, reference: Reference | None = None
    ) -> float:
        """Expected seconds from sending the job to its last token."""
        table, cols = self._one(c, 0.0, reference)
        return float(self._finish(table, cols, job)[0])

    def score(
        self, c: Candidate, job: JobEstimate, now: float, reference: Reference | None = None
    ) -> float:
        """Lower is better: expected finish + price weight × cost + failure penalty.
        ``reference`` is ``self.reference(pool)`` of the pool ``c`` is ranked in."""
        table, cols = self._one(c, now, reference)
        return float(self._score(table, cols, job)[0])

    def choose(
        self, candidates: Sequence[Candidate], job: JobEstimate, now: float
    ) -> list[Candidate]:
        """Eligible candidates ordered first choice, then fallbacks; empty if none."""
        pool = self.eligible(candidates, job)
        table = CandidateTable(pool, capacity=len(pool))
        return [table.candidate(row) for row in self.rank(table, job, now)]

    def rank(
        self,
        table: CandidateTable,
        job: JobEstimate,
        now: float,
        *,
        exclude: Collection[str] = (),
        limit: int | None = None,
    ) -> list[int]:
        """Rows of ``table`` eligible for ``job``, first choice then fallbacks, leaving
        out the peers in ``exclude``; only the first ``limit`` when given (the order of
        that prefix is the same as without a limit). Peers cooling down after being
        unreachable (``record_unreachable``) come last, soonest to recover first, unless
        no other peer is eligible."""
        cooling = {pid: s.cooling_until for pid, s in self._stats.items()
                   if s.cooling_until > now and pid not in exclude}
        cold = [(until, pid, row) for pid, until in cooling.items()
                if (row := table.row_of(pid)) is not None]
        if cold:
            warm = self._rank(table, job, now, exclude=[*exclude, *cooling], limit=limit)
            if warm:
                eligible = set(self._eligible_rows(table, job, now, exclude).tolist())
                tail = [row for _, _, row in sorted(cold) if row in eligible]
                out = warm + tail
                return out if limit is None else out[: max(0, limit)]
        return self._rank(table, job, now, exclude=exclude, limit=limit)

    def _rank(
        self,
        table: CandidateTable,
        job: JobEstimate,
        now: float,
        *,
        exclude: Collection[str],
        limit: int | None,
    ) -> list[int]:
        rows = self._eligible_rows(table, job, now, exclude)
        k = len(rows)
        if k == 0:
            return []
        want = k if limit is None else max(0, min(limit, k))
        if self.strategy is Strategy.RANDOM:
            return rows[self._rng.permutation(k)[:want]].tolist()  # type: ignore[no-any-return]
        if self.strategy is Strategy.ROUND_ROBIN:
            start = self._rr_next % k
            self._rr_next += 1
            return rows[(start + np.arange(want)) % k].tolist()  # type: ignore[no-any-return]
        cols = self._columns(table, rows, now)
        score = self._score(table, cols, job)
        if self.strategy is Strategy.FASTEST:
            order = _smallest(score, want)
        elif self.strategy is Strategy.CHEAPEST:
            order = _smallest_by(self._cost(table, cols, job), score, want)
        elif self.strategy is Strategy.LEAST_LOADED:
            load = self._load(table, cols) / np.maximum(1.0, table.slots[cols.sel])
            order = _smallest_by(load, score, want)
        elif 0 < len(cols.explored_at) < k:
            order = self._explore(score, cols, want)
        else:
            order = self._power_of_two(score, want)
        return rows[order].tolist()  # type: ignore[no-any-return]

    def _explore(self, score: Floats, cols: _Columns, want: int) -> Ints:
        """p2c among the explored rows, after the one probe that is due (if any); the
        other unexplored rows are fallbacks (module docstring)."""
        explored = np.zeros(len(score), dtype=np.bool_)
        explored[cols.explored_at] = True
        known, fresh = np.flatnonzero(explored), np.flatnonzero(~explored)
        head: list[int] = []
        if self._probes < self.max_probe_share * self._started + 1:
            probing = np.zeros(len(score), dtype=np.bool_)
            probing[cols.probing_at] = True
            free = fresh[~probing[fresh]]
            if len(free):
                bar = score[known].min() * self.p2c_score_cutoff
                if self.spread_probes:
                    near = free[score[free] <= bar]
                    if len(near):
                        head = [int(near[self._power_of_two(score[near], 1)[0]])]
                else:
                    # the best-scored free one (first in row order on ties): the cut-off
                    # grows with the score, so if it misses, every other one does too
                    best_free = int(free[np.argmin(score[free])])
                    if score[best_free] <= bar:
                        head = [best_free]
        ranked_known = known[self._power_of_two(score[known], want)]
        ranked_fresh = fresh[_smallest(score[fresh], min(want + 1, len(fresh)))]
        ranked_fresh = ranked_fresh[~np.isin(ranked_fresh, head)]
        order: Ints = np.concatenate(
            (np.asarray(head, dtype=np.int64), ranked_known, ranked_fresh))
        return order[:want]

    def _power_of_two(self, score: Floats, want: int) -> Ints:
        # Two random candidates, keep the better: spreads load even when every client
        # sees the same stale adverts, where always taking the best would herd.
        contenders = np.flatnonzero(score <= score.min() * self.p2c_score_cutoff)
        if len(contenders) < 2:
            return _smallest(score, want)
        i = int(self._rng.integers(len(contenders)))
        j = int(self._rng.integers(len(contenders) - 1))
        a, b = contenders[i], contenders[j + (j >= i)]
        first = a if score[a] <= score[b] else b
        rest = _smallest(score, min(want + 1, len(score)))
        return np.concatenate(([first], rest[rest != first]))[:want]

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
        stats.cooling_until = stats.cooldown_s = 0.0
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

    def record_unreachable(self, peer_id: str, now: float) -> None:
        """A job failed before its first token because the provider could not be
        reached (dial failed, connection dropped, silence): a failure, and the peer is
        skipped while others are eligible for UNREACHABLE_COOLDOWN_S, doubling each time
        in a row (up to MAX_UNREACHABLE_COOLDOWN_S). A success or a newer advert
        (``note_advert``) ends it."""
        self.record_failure(peer_id, now)
        stats = self._peer(peer_id, now)
        stats.cooldown_s = (UNREACHABLE_COOLDOWN_S if stats.cooldown_s == 0.0 else
                            min(MAX_UNREACHABLE_COOLDOWN_S, 2 * stats.cooldown_s))
        stats.cooling_until = now + stats.cooldown_s

    def cooling_down(self, peer_id: str, now: float) -> bool:
        stats = self._stats.get(peer_id)
        return stats is not None and stats.cooling_until > now

    def note_advert(self, peer_id: str, seq: int) -> None:
        """An advert of ``peer_id`` is listed: a higher seq than seen before means the
        provider is alive and re-announced itself, which ends its cooldown."""
        stats = self._stats.get(peer_id)
        if stats is None:
            return
        if seq > stats.advert_seq:
            if stats.advert_seq >= 0:
                stats.cooling_until = stats.cooldown_s = 0.0
            stats.advert_seq = seq

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
