"""The routing lab's discrete-event simulator.

What is real and what is modelled:

* real: every client's ``Router`` (``meshnode.core.router``), each city's ``Directory``
  (``meshnode.core.directory``) and the adverts themselves (``meshnode.core.advert``:
  each publish is encoded and Ed25519-signed, each receipt decoded and verified), the
  node's timing rules (advert lifetime, republish period, load-change debounce, dial
  timeout, retry budget, slots and queue limit), all imported from the node's modules;
* modelled: the network (``geo``: RTT from city distances, gossip delay per hop),
  providers' speed (llama.cpp benchmark tables, one sequence per slot, FIFO queue),
  churn (Weibull sessions), job sizes (a real trace) and Poisson arrivals.

Clients know providers only through adverts that reached their city by gossip, so load
is as stale as the publish debounce and gossip delay make it, and a provider that left
stays listed until its advert expires. The Cocoon-like ``oracle`` and the Petals-like
``min_rtt`` are strategies of the simulator, not of the node: the oracle sees every
provider's true backlog at every instant and routes through a proxy (an extra hop).

A run is deterministic for a scenario, a strategy and a seed.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from nacl.signing import SigningKey

from meshnode.core.advert import Advert, Capacity, Load, ModelOffer, encode_body, sign_body
from meshnode.core.directory import Directory
from meshnode.core.peerid import peer_id_from_ed25519
from meshnode.core.router import JobEstimate, Router, Strategy
from meshnode.lab.baselines import nearest_proxies, pick_min_rtt, pick_oracle, proxy_legs
from meshnode.lab.gossip import CityView, VerifyOnce
from meshnode.lab.scenario import Scenario
from meshnode.lab.workload import (
    Floats,
    Jobs,
    Mesh,
    availability,
    build_jobs,
    build_mesh,
    read_trace,
    weibull_scale,
)
from meshnode.p2p.discovery import (
    EXPIRE_INTERVAL_S,
    GOSSIP_REPUBLISH_S,
)
from meshnode.p2p.gossip import GOSSIP_DEGREE

MODEL_ID = hashlib.sha256(b"meshnode-lab-model").hexdigest()
# After py-libp2p's wait before every dial (Scenario.dial_delay_s: 250 ms, DESIGN.md),
# TCP, Noise XX and yamux take about three round trips before the first stream opens.
CONNECT_ROUND_TRIPS = 3
# Providers publish their first advert at a random moment of the period before jobs
# start, as a mesh that has been running does; one republish period is enough for
# every live provider to be listed everywhere.
WARMUP_S = GOSSIP_REPUBLISH_S + 5.0
PROXY_STRATEGY = "oracle"
MIN_RTT_STRATEGY = "min_rtt"
SIM_STRATEGIES = (MIN_RTT_STRATEGY, PROXY_STRATEGY)
ALL_STRATEGIES = (*[s.value for s in Strategy], *SIM_STRATEGIES)

# event kinds (ints: cheaper to push and compare than enums in the hot loop)
_ARRIVE, _REACH, _CLIENT_FAIL, _PROV_DONE, _CLIENT_DONE = range(5)
_PUBLISH, _DELIVER, _EXPIRE, _LEAVE, _JOIN = range(5, 10)
# why an attempt failed
FAIL_BUSY, FAIL_UNREACHABLE, FAIL_BROKEN = "busy", "unreachable", "broken"


@dataclass
class Outcome:
    """Per-job results (index = job number) and run-wide counters."""

    arrival: Floats
    ttft: Floats  # seconds from arrival to first token; NaN if none came
    finish: Floats  # seconds from arrival to last token; NaN if the job failed
    cost: Floats  # nanoton paid
    attempts: np.ndarray
    tokens: np.ndarray  # completion tokens delivered
    served_by: np.ndarray  # provider of the last successful attempt, -1 if none
    queue_wait: Floats  # seconds the last admitted attempt waited for a slot; NaN if none
    failed_attempts: dict[str, int]
    busy_s: Floats  # per provider, inside the window
    online_s: Floats  # per provider, inside the window
    window: tuple[float, float]
    measured_from: int  # first job counted in the metrics
    counters: dict[str, int]
    wall_s: float = 0.0
    cpu_s: float = 0.0  # this process's CPU time: what the run costs without contention
    capacity_jobs_per_s: float = 0.0


@dataclass
class _Job:
    prompt: int
    remaining: int
    client: int
    tried: set[int] = field(default_factory=set)
    tried_peers: set[str] = field(default_factory=set)
    attempt: int = 0  # id of the attempt in flight
    provider: int = -1
    sent_at: float = 0.0
    rtt: float = 0.0
    start: float = 0.0  # when a slot took it
    prompt_s: float = 0.0
    end: float = 0.0
    first_token_at: float = math.nan
    delivered: int = 0  # tokens received from providers that failed mid-stream


class Simulation:
    def __init__(
        self,
        sc: Scenario,
        strategy: str,
        *,
        seed: int | None = None,
        jobs: Jobs | None = None,
        estimate_exact: bool = False,
    ) -> None:
        """``jobs`` replaces the scenario's job list (a replay of a real run);
        ``estimate_exact`` makes clients ask for exactly the tokens a job produces, as
        the real clients of ``lab real`` do, instead of the scenario's max_tokens."""
        if strategy not in ALL_STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose from {ALL_STRATEGIES}")
        self.sc = sc
        self.strategy = strategy
        seed = sc.seed if seed is None else seed
        setup = np.random.default_rng(seed)  # same mesh and jobs for every strategy
        self.mesh: Mesh = build_mesh(sc, setup)
        self.trace = read_trace(sc)
        built, capacity = build_jobs(sc, self.mesh, self.trace, setup)
        jobs = built if jobs is None else jobs
        self.jobs: Jobs = jobs
        self.estimate_exact = estimate_exact
        self.capacity = capacity
        self.chance = np.random.default_rng(seed + 1)  # churn draws
        self.churn_rng = np.random.default_rng(seed + 2)
        n = self.mesh.providers
        self.keys = [setup.bytes(32) for _ in range(n)]
        self.pubkeys = [bytes(SigningKey(k).verify_key) for k in self.keys]
        self.peer_ids = [peer_id_from_ed25519(pk) for pk in self.pubkeys]
        self.job_pubkey = setup.bytes(32)

        # provider state
        self.online = np.ones(n, dtype=bool)
        self.slot_free: list[list[float]] = [[0.0] * sc.slots for _ in range(n)]
        self.next_free = np.zeros(n)
        self.outstanding = np.zeros(n, dtype=np.int64)
        self.active: list[set[int]] = [set() for _ in range(n)]
        self.seq = [0] * n
        self.publishes = [0] * n
        self.last_publish = np.full(n, -math.inf)
        self.load_pending = [False] * n
        self.busy_s = np.zeros(n)
        self.online_s = np.zeros(n)
        self.online_since = np.zeros(n)

        # client side
        self.client_city = [self.mesh.latency.cities[c] for c in self.mesh.c_city]
        view_cities = sorted(set(self.client_city))
        self.verify = VerifyOnce(deliveries=len(view_cities))
        self.views = {
            city: CityView(Directory(max_entries=sc.directory_max_entries, decode=self.verify,
                                     rate_per_s=sc.directory_rate_per_s))
            for city in view_cities
        }
        self.view_list = list(self.views.values())
        self.view_of_client = [self.views[c] for c in self.client_city]
        router_strategy = strategy if strategy not in SIM_STRATEGIES else Strategy.RANDOM.value
        self.routers = [
            Router(Strategy(router_strategy), seed=seed * 7919 + c,
                   p2c_score_cutoff=sc.p2c_score_cutoff, max_probe_share=sc.max_probe_share,
                   spread_probes=sc.spread_probes)
            for c in range(sc.clients)
        ]
        self.connected: set[tuple[int, int]] = set()
        self._gossip_delay = self._gossip_delays(view_cities)
        self._proxy = self._proxies()

        self.events: list[tuple[float, int, int, int, int]] = []
        self._tie = itertools.count()
        self._attempts = itertools.count(1)
        self.adverts: dict[int, bytes] = {}
        self._advert_ids = itertools.count()
        self._advert_left: dict[int, int] = {}
        self.live: dict[int, _Job] = {}
        m = len(jobs.arrival)
        self.out = Outcome(
            arrival=jobs.arrival + WARMUP_S,
            ttft=np.full(m, np.nan),
            finish=np.full(m, np.nan),
            cost=np.zeros(m),
            attempts=np.zeros(m, dtype=np.int64),
            tokens=np.zeros(m, dtype=np.int64),
            served_by=np.full(m, -1, dtype=np.int64),
            queue_wait=np.full(m, np.nan),
            failed_attempts={FAIL_BUSY: 0, FAIL_UNREACHABLE: 0, FAIL_BROKEN: 0},
            busy_s=self.busy_s,
            online_s=self.online_s,
            window=(0.0, 0.0),
            measured_from=int(sc.warmup_fraction * m),
            counters={"events": 0, "adverts_published": 0, "deliveries": 0,
                      "deliveries_rejected": 0, "no_provider": 0, "jobs_failed": 0,
                      # why jobs queue: picks of a provider that had a job at that
                      # moment, and of one its client's listing showed busy
                      "picks": 0, "picks_busy": 0, "picks_listed_busy": 0},
            capacity_jobs_per_s=capacity,
        )
        arr = self.out.arrival
        self.window = (float(arr[self.out.measured_from]), float(arr[-1]))
        self.out.window = self.window

    # ------------------------------------------------------------------ set-up helpers

    def _gossip_delays(self, view_cities: list[str]) -> Floats:
        """Seconds from a provider's publish to a city's directory, per provider-city
        pair: the direct one-way path plus the extra gossip hops a mesh of degree
        GOSSIP_DEGREE needs to reach everyone, each hop also paying processing time."""
        lat = self.mesh.latency
        nodes = self.mesh.providers + self.mesh.clients
        hops = max(1, math.ceil(math.log(max(2, nodes)) / math.log(GOSSIP_DEGREE)))
        owd = lat.base_ms / 2e3
        mean_owd = float(owd[np.ix_(self.mesh.p_city, self.mesh.p_city[:200])].mean())
        cols = np.array([lat.index(c) for c in view_cities], dtype=np.int64)
        direct = owd[np.ix_(self.mesh.p_city, cols)] + self.mesh.p_last_mile_ms[:, None] / 2e3
        per_hop = self.sc.gossip_hop_processing_ms / 1e3
        delays: Floats = direct + (hops - 1) * mean_owd + hops * per_hop
        return delays

    def _proxies(self) -> list[int]:
        lat = self.mesh.latency
        return nearest_proxies(self.mesh, [lat.index(c) for c in self.sc.proxy_cities])

    # ------------------------------------------------------------------------ events

    def at(self, t: float, kind: int, a: int = 0, b: int = 0) -> None:
        heapq.heappush(self.events, (t, next(self._tie), kind, a, b))

    def run(self, *, progress: Callable[[str], None] | None = None) -> Outcome:
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        sc = self.sc
        share_online = availability(sc)
        for p in range(self.mesh.providers):
            if sc.churn and self.churn_rng.random() >= share_online:
                # Start in the long-run mix: this provider is offline now and comes
                # back after the rest of its offline period.
                self.online[p] = False
                self.at(self._residual_s(sc.offline_median_s), _JOIN, p)
                continue
            self.at(float(self.chance.uniform(0, GOSSIP_REPUBLISH_S)), _PUBLISH, p, -1)
            if sc.churn:
                self.at(self._residual_s(sc.session_median_s), _LEAVE, p)
        for city in range(len(self.views)):
            self.at(EXPIRE_INTERVAL_S, _EXPIRE, city)
        for j in range(len(self.jobs.arrival)):
            self.at(float(self.out.arrival[j]), _ARRIVE, j)
        handlers = {
            _ARRIVE: self._arrive, _REACH: self._reach, _CLIENT_FAIL: self._client_fail,
            _PROV_DONE: self._prov_done, _CLIENT_DONE: self._client_done,
            _PUBLISH: self._publish, _DELIVER: self._deliver,
            _LEAVE: self._leave, _JOIN: self._join,
        }  # fmt: skip
        pending = len(self.jobs.arrival)
        events = self.events
        views = self.view_list
        step = max(1, pending // 10)
        done_jobs = 0
        while events and pending:
            now, _, kind, a, b = heapq.heappop(events)
            self.out.counters["events"] += 1
            if kind == _EXPIRE:
                views[a].expire(now)
                self.at(now + EXPIRE_INTERVAL_S, _EXPIRE, a)
                continue
            finished = handlers[kind](now, a, b)
            if finished:
                pending -= 1
                done_jobs += 1
                if progress is not None and done_jobs % step == 0:
                    progress(f"{done_jobs}/{len(self.jobs.arrival)} jobs, sim t={now:.1f} s, "
                             f"wall {time.perf_counter() - t0:.1f} s")
        t_end = self.window[1]
        for row in np.flatnonzero(self.online):
            self._account_online(int(row), t_end)
        self.out.wall_s = time.perf_counter() - t0
        self.out.cpu_s = time.process_time() - cpu0
        self.out.counters["adverts_verified"] = self.verify.verified
        return self.out

    # -------------------------------------------------------------------- providers

    def _session_s(self) -> float:
        k = self.sc.session_weibull_shape
        return float(weibull_scale(k, self.sc.session_median_s) * self.churn_rng.weibull(k))

    def _residual_s(self, median: float) -> float:
        """Time left in a session (or an offline period) seen at a random moment: a
        uniform share of a length-biased Weibull draw, which for Weibull(k, λ) is
        λ·G^(1/k) with G ~ Gamma(1 + 1/k). Long sessions are the likely ones to be in,
        so with a heavy tail most residuals are long."""
        if median <= 0:
            return 0.0
        k = self.sc.session_weibull_shape
        biased = weibull_scale(k, median) * self.churn_rng.gamma(1 + 1 / k) ** (1 / k)
        return float(biased * self.churn_rng.random())

    def _offline_s(self) -> float:
        k = self.sc.session_weibull_shape
        if self.sc.offline_median_s <= 0:
            return 0.0
        return float(weibull_scale(k, self.sc.offline_median_s) * self.churn_rng.weibull(k))

    def _account_online(self, p: int, now: float) -> None:
        lo, hi = self.window
        a, b = max(lo, float(self.online_since[p])), min(hi, now)
        if b > a:
            self.online_s[p] += b - a

    def _account_busy(self, p: int, start: float, end: float) -> None:
        lo, hi = self.window
        a, b = max(lo, start), min(hi, end)
        if b > a:
            self.busy_s[p] += b - a

    def _load_changed(self, p: int, now: float) -> None:
        if self.load_pending[p]:
            return
        self.load_pending[p] = True
        when = max(now, float(self.last_publish[p]) + self.sc.load_publish_interval_s)
        self.at(when, _PUBLISH, p, -2 - self.publishes[p])

    def _publish(self, now: float, p: int, token: int) -> bool:
        if not self.online[p]:
            return False
        if token >= 0 and token != self.publishes[p]:
            return False  # a periodic timer another publish has reset
        if token <= -2 and -2 - token != self.publishes[p]:
            return False  # a load-change publish another publish already covered
        self.publishes[p] += 1
        self.last_publish[p] = now
        self.load_pending[p] = False
        self.at(now + GOSSIP_REPUBLISH_S, _PUBLISH, p, self.publishes[p])
        self.seq[p] += 1
        busy = min(int(self.outstanding[p]), self.sc.slots)
        advert = Advert(
            peer_id=self.peer_ids[p],
            peer_pubkey=self.pubkeys[p],
            addrs=(),
            models=(
                ModelOffer(
                    id=MODEL_ID,
                    name="lab-model",
                    quant="Q4_0",
                    ctx=4096,
                    price_prompt_per_1k=int(self.mesh.p_price_prompt[p]),
                    price_completion_per_1k=int(self.mesh.p_price_completion[p]),
                ),
            ),
            capacity=Capacity(slots=self.sc.slots, tokens_per_s=float(self.mesh.p_decode[p])),
            load=Load(busy_slots=busy, queue_len=int(self.outstanding[p]) - busy),
            job_pubkey=self.job_pubkey,
            seq=self.seq[p],
            issued_at=now,
            expires_at=now + self.sc.advert_lifetime_s,
            attestation=b"lab",
        )
        data = sign_body(encode_body(advert), self.keys[p])
        aid = next(self._advert_ids)
        self.adverts[aid] = data
        self._advert_left[aid] = len(self.views)
        self.out.counters["adverts_published"] += 1
        for city, delay in enumerate(self._gossip_delay[p]):
            self.at(now + float(delay), _DELIVER, city, aid * 1_000_000 + p)
        return False

    def _deliver(self, now: float, city: int, packed: int) -> bool:
        aid, p = divmod(packed, 1_000_000)
        data = self.adverts[aid]
        self._advert_left[aid] -= 1
        if self._advert_left[aid] == 0:
            del self.adverts[aid], self._advert_left[aid]
        self.out.counters["deliveries"] += 1
        if not self.view_list[city].deliver(data, p, now):
            self.out.counters["deliveries_rejected"] += 1
        return False

    def _leave(self, now: float, p: int, _b: int) -> bool:
        self.online[p] = False
        self._account_online(p, now)
        for j in list(self.active[p]):
            job = self.live[j]
            self._abort(j, job, p, now)
        self.active[p].clear()
        self.outstanding[p] = 0
        self.at(now + self._offline_s(), _JOIN, p)
        return False

    def _abort(self, j: int, job: _Job, p: int, now: float) -> None:
        """The provider vanished mid-job: the client keeps what was delivered and
        continues elsewhere from there (``jobs/routed.py``)."""
        decode = float(self.mesh.p_decode[p])
        gen_start = job.start + job.prompt_s
        delivered = 0
        if now > gen_start:
            delivered = min(job.remaining, int((now - gen_start) * decode))
        self._account_busy(p, job.start, min(now, job.end))
        if delivered > 0:
            if math.isnan(job.first_token_at):
                job.first_token_at = gen_start + 1 / decode + job.rtt / 2
            self.out.cost[j] += delivered * float(self.mesh.p_price_completion[p]) / 1000
            self.out.tokens[j] += delivered
            job.prompt += delivered
            job.remaining -= delivered
            job.delivered += delivered
        self.at(now + job.rtt / 2, _CLIENT_FAIL, j, job.attempt)
        job.attempt = -job.attempt  # the provider side of this attempt is gone
        self.out.failed_attempts[FAIL_BROKEN] += 1

    def _join(self, now: float, p: int, _b: int) -> bool:
        self.online[p] = True
        self.online_since[p] = now
        self.slot_free[p] = [now] * self.sc.slots
        self.next_free[p] = now
        self.at(now, _PUBLISH, p, -2 - self.publishes[p])
        self.load_pending[p] = True
        if self.sc.churn:
            self.at(now + self._session_s(), _LEAVE, p)
        return False

    # ------------------------------------------------------------------------- jobs

    def _arrive(self, now: float, j: int, _b: int) -> bool:
        jobs = self.jobs
        job = _Job(prompt=int(jobs.prompt[j]), remaining=int(jobs.completion[j]),
                   client=int(jobs.client[j]))
        self.live[j] = job
        return self._send(j, job, now)

    def _estimate(self, job: _Job) -> JobEstimate:
        # A client knows its prompt and its max_tokens, not how long the answer will be.
        if self.estimate_exact:
            return JobEstimate(MODEL_ID, job.prompt, max(1, job.remaining))
        return JobEstimate(MODEL_ID, job.prompt, max(1, self.sc.max_tokens - job.delivered))

    def _pick(self, job: _Job, now: float) -> int | None:
        view = self.view_of_client[job.client]
        if self.strategy == PROXY_STRATEGY:
            return pick_oracle(
                self.mesh,
                admissible=self.online & (self.outstanding < self.sc.slots + self.sc.max_queue),
                next_free=self.next_free,
                legs=self._oracle_legs(job.client),
                prompt_tokens=job.prompt,
                max_tokens=self.sc.max_tokens,
                tried=job.tried,
                now=now,
            )
        if self.strategy == MIN_RTT_STRATEGY:
            return pick_min_rtt(view, self.mesh.rtt_row_s(job.client), job.tried_peers, now)
        router = self.routers[job.client]
        ranked = router.rank(view.table, self._estimate(job), now,
                             exclude=job.tried_peers, limit=1)
        if not ranked:
            return None
        row = ranked[0]
        p = int(view.row_provider[row])
        counters = self.out.counters
        counters["picks"] += 1
        counters["picks_busy"] += int(self.outstanding[p] > 0)
        counters["picks_listed_busy"] += int(view.table.busy[row] + view.table.queue[row] > 0)
        return p

    def _oracle_legs(self, client: int) -> Floats:
        return proxy_legs(self.mesh, client, self._proxy[client])

    def _send(self, j: int, job: _Job, now: float) -> bool:
        out = self.out
        if out.attempts[j] >= self.sc.max_attempts:
            return self._fail_job(j)
        p = self._pick(job, now)
        if p is None:
            out.counters["no_provider"] += 1
            return self._fail_job(j)
        out.attempts[j] += 1
        job.tried.add(p)
        job.tried_peers.add(self.peer_ids[p])
        job.provider = p
        job.attempt = next(self._attempts)
        job.sent_at = now
        if self.strategy == PROXY_STRATEGY:
            job.rtt = float(self._oracle_legs(job.client)[p])
            setup = 0.0  # client-proxy and proxy-worker connections stay open
        else:
            job.rtt = self.mesh.rtt_s(job.client, p)
            key = (job.client, p)
            setup = (0.0 if key in self.connected
                     else self.sc.dial_delay_s + CONNECT_ROUND_TRIPS * job.rtt)
            self.routers[job.client].record_start(self.peer_ids[p], now)
        if self.strategy == PROXY_STRATEGY:
            # The proxy is the dispatcher: it books the job on the provider the moment
            # it forwards it, so its view of every backlog is never stale, not even by
            # the jobs still on the wire (a mesh client cannot know those of others).
            self._admit(j, job, p, arrive=now + job.rtt / 2, now=now)
        elif not self.online[p]:
            self.at(now + self.sc.dial_timeout_s, _CLIENT_FAIL, j, job.attempt)
            self.out.failed_attempts[FAIL_UNREACHABLE] += 1
            job.attempt = -job.attempt
        else:
            self.at(now + setup + job.rtt / 2, _REACH, j, job.attempt)
        return False

    def _fail_job(self, j: int) -> bool:
        self.out.counters["jobs_failed"] += 1
        del self.live[j]
        return True

    def _reach(self, now: float, j: int, attempt: int) -> bool:
        job = self.live[j]
        if job.attempt != attempt:
            return False
        p = job.provider
        self.connected.add((job.client, p))
        if not self.online[p]:
            self.at(now + job.rtt / 2, _CLIENT_FAIL, j, attempt)
            self.out.failed_attempts[FAIL_UNREACHABLE] += 1
            job.attempt = -attempt
            return False
        if self.outstanding[p] >= self.sc.slots + self.sc.max_queue:
            self.at(now + job.rtt / 2, _CLIENT_FAIL, j, attempt)
            self.out.failed_attempts[FAIL_BUSY] += 1
            job.attempt = -attempt
            return False
        self._admit(j, job, p, arrive=now, now=now)
        return False

    def _admit(self, j: int, job: _Job, p: int, *, arrive: float, now: float) -> None:
        """The provider takes the job into its FIFO queue: it starts on the first slot
        that frees after ``arrive``."""
        heap = self.slot_free[p]
        start = max(arrive, heapq.heappop(heap))
        job.start = start
        self.out.queue_wait[j] = start - arrive
        job.prompt_s = job.prompt / float(self.mesh.p_prompt[p])
        job.end = start + job.prompt_s + job.remaining / float(self.mesh.p_decode[p])
        heapq.heappush(heap, job.end)
        self.next_free[p] = heap[0]
        self.outstanding[p] += 1
        self.active[p].add(j)
        self._load_changed(p, now)
        self.at(job.end, _PROV_DONE, j, job.attempt)

    def _prov_done(self, now: float, j: int, attempt: int) -> bool:
        job = self.live.get(j)
        if job is None or job.attempt != attempt:
            return False
        p = job.provider
        self.outstanding[p] -= 1
        self.active[p].discard(j)
        self._account_busy(p, job.start, job.end)
        self._load_changed(p, now)
        self.at(now + job.rtt / 2, _CLIENT_DONE, j, attempt)
        return False

    def _client_done(self, now: float, j: int, attempt: int) -> bool:
        job = self.live[j]
        if job.attempt != attempt:
            return False
        p = job.provider
        decode = float(self.mesh.p_decode[p])
        first = job.start + job.prompt_s + 1 / decode + job.rtt / 2
        if math.isnan(job.first_token_at):
            job.first_token_at = first
        out = self.out
        arrival = float(out.arrival[j])
        out.ttft[j] = job.first_token_at - arrival
        out.finish[j] = now - arrival
        out.cost[j] += (job.prompt * float(self.mesh.p_price_prompt[p])
                        + job.remaining * float(self.mesh.p_price_completion[p])) / 1000
        out.tokens[j] += job.remaining
        out.served_by[j] = p
        if self.strategy != PROXY_STRATEGY:
            self.routers[job.client].record_success(
                self.peer_ids[p],
                now,
                duration_s=now - job.sent_at,
                completion_tokens=job.remaining,
                first_token_s=first - job.sent_at,
                rtt_sample_s=job.rtt,
            )
        del self.live[j]
        return True

    def _client_fail(self, now: float, j: int, attempt: int) -> bool:
        job = self.live[j]
        if job.attempt != -attempt:
            return False
        if self.strategy != PROXY_STRATEGY:
            self.routers[job.client].record_failure(self.peer_ids[job.provider], now)
        if job.remaining <= 0:
            return self._fail_job(j)
        return self._send(j, job, now)
