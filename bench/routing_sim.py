"""Discrete-event routing simulator: the node's own Router against simulated providers.

N providers of different speeds, slots, prices and RTTs (one of them flaky) serve M
jobs from several clients, each client with its own ``meshnode.core.router.Router``.
Clients see provider load only through adverts republished every --advert-period s, as in
the real mesh, so stale load and herding show up. Two workloads:

* ``poisson``: jobs arrive as a Poisson process at a fraction of total capacity,
  spread over several clients;
* ``sequential``: one client, each job sent when the previous one finished.

For each strategy it reports each provider's share of jobs, time to finish (mean, p50,
p95), failures seen and mean cost, and the ratio of mean time to finish against the
random strategy. Writes bench/results/routing_sim.json, and routing_sim.png when
matplotlib is installed. Pure Python and seeded: the same arguments give the same file.

Run from the repository root: ``python -m bench.routing_sim [--jobs 2000] [--seed 1]``.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import itertools
import json
import random
import statistics
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshnode.core.router import Candidate, JobEstimate, Router, Strategy

MODEL_ID = hashlib.sha256(b"routing-sim-model").hexdigest()
DEFAULT_ADVERT_PERIOD_S = 5.0  # how often providers republish load (real nodes: ~1-60 s)
FAILURE_RATE = 0.3  # share of jobs the flaky provider refuses before the first token
# llama.cpp prompt eval vs decode speed; the same ratio the router assumes.
PROMPT_SPEEDUP = 10.0
DEFAULT_UTILISATION = 0.7  # busy enough that queueing matters, short of overload
DEFAULT_CLIENTS = 4
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class SimConfig:
    providers: int = 7
    clients: int = DEFAULT_CLIENTS  # in the poisson workload; sequential has one
    advert_period_s: float = DEFAULT_ADVERT_PERIOD_S
    utilisation: float = DEFAULT_UTILISATION
    seed: int = 1


@dataclass
class SimProvider:
    name: str
    tokens_per_s: float
    slots: int
    rtt_s: float
    price_per_1k: int  # nanoton, same for prompt and completion
    flaky: bool = False
    busy: int = 0
    queue: deque[int] = field(default_factory=deque)
    published: tuple[int, int] = (0, 0)  # (busy, queue) as last advertised

    def candidate(self) -> Candidate:
        return Candidate(
            peer_id=self.name,
            model_id=MODEL_ID,
            price_prompt_per_1k=self.price_per_1k,
            price_completion_per_1k=self.price_per_1k,
            slots=self.slots,
            busy_slots=self.published[0],
            queue_len=self.published[1],
            tokens_per_s=self.tokens_per_s,
            verified=True,
        )

    def service_s(self, job: SimJob) -> tuple[float, float]:
        """(seconds to the first token, seconds for the whole job) once a slot is free."""
        prompt = job.prompt_tokens / (self.tokens_per_s * PROMPT_SPEEDUP)
        return prompt + 1 / self.tokens_per_s, prompt + job.completion_tokens / self.tokens_per_s


@dataclass
class SimJob:
    index: int
    client: int
    arrival: float
    prompt_tokens: int
    completion_tokens: int
    fallbacks: list[str] = field(default_factory=list)
    sent_at: float = 0.0  # when the current attempt was sent
    provider: str = ""
    first_token_at: float = 0.0
    failures: int = 0


def make_providers(n: int, rng: random.Random) -> list[SimProvider]:
    """Providers from slow CPUs to fast GPUs; faster ones charge more. The third is
    flaky (fast, cheap — tempting — but refuses some jobs)."""
    providers = []
    for i in range(n):
        speed = 8.0 * (1.6**i)  # 8 tok/s (CPU) up to >100 tok/s (GPU) for n = 7
        providers.append(
            SimProvider(
                name=f"p{i}-{speed:.0f}tps",
                tokens_per_s=speed,
                slots=1 + i // 3,
                rtt_s=rng.uniform(0.01, 0.3),
                price_per_1k=int(200_000 * (1.3**i)),
                flaky=(i == 2),
            )
        )
    return providers


def make_jobs(
    m: int, mode: str, capacity_jobs_per_s: float, cfg: SimConfig, rng: random.Random
) -> list[SimJob]:
    jobs, t = [], 0.0
    rate = cfg.utilisation * capacity_jobs_per_s
    for i in range(m):
        if mode == "poisson":
            t += rng.expovariate(rate)
        jobs.append(
            SimJob(
                index=i,
                client=rng.randrange(cfg.clients) if mode == "poisson" else 0,
                arrival=t,
                prompt_tokens=rng.randint(20, 400),
                completion_tokens=rng.randint(32, 400),
            )
        )
    return jobs


def simulate(strategy: Strategy, mode: str, n_jobs: int, cfg: SimConfig) -> dict[str, Any]:
    seed = cfg.seed
    setup = random.Random(seed)  # identical providers and jobs for every strategy
    providers = {p.name: p for p in make_providers(cfg.providers, setup)}
    mean_tokens = 216.0  # mean of randint(32, 400)
    capacity = sum(p.slots * p.tokens_per_s / mean_tokens for p in providers.values())
    jobs = make_jobs(n_jobs, mode, capacity, cfg, setup)
    chance = random.Random(seed + 1)  # failures and RTT jitter
    routers = [Router(strategy, seed=seed * 100 + c) for c in range(cfg.clients)]
    for router in routers:  # clients ping every provider they learn about
        for p in providers.values():
            router.record_rtt(p.name, p.rtt_s, 0.0)

    events: list[tuple[float, int, str, int]] = []
    tiebreak = itertools.count()

    def at(t: float, kind: str, job_index: int) -> None:
        heapq.heappush(events, (t, next(tiebreak), kind, job_index))

    def job_estimate(job: SimJob) -> JobEstimate:
        return JobEstimate(MODEL_ID, job.prompt_tokens, job.completion_tokens)

    def send(job: SimJob, now: float) -> None:
        target = providers[job.fallbacks.pop(0)]
        job.provider, job.sent_at = target.name, now
        routers[job.client].record_start(target.name, now)
        if target.flaky and chance.random() < FAILURE_RATE:
            at(now + target.rtt_s, "refused", job.index)
        else:
            at(now + target.rtt_s / 2, "reach", job.index)

    def start_service(p: SimProvider, job: SimJob, now: float) -> None:
        p.busy += 1
        first, total = p.service_s(job)
        job.first_token_at = now + first + p.rtt_s / 2
        at(now + total, "served", job.index)

    if mode == "sequential":
        at(0.0, "arrive", 0)
    else:
        for job in jobs:
            at(job.arrival, "arrive", job.index)
    at(0.0, "advertise", -1)

    finished: dict[int, float] = {}
    served_by: Counter[str] = Counter()
    cost = 0.0
    while events and len(finished) < n_jobs:
        now, _, kind, index = heapq.heappop(events)
        if kind == "advertise":
            for p in providers.values():
                p.published = (p.busy, len(p.queue))
            at(now + cfg.advert_period_s, "advertise", -1)
            continue
        job = jobs[index]
        router = routers[job.client]
        if kind == "arrive":
            job.arrival = now
            pool = [p.candidate() for p in providers.values()]
            job.fallbacks = [c.peer_id for c in router.choose(pool, job_estimate(job), now)]
            send(job, now)
        elif kind == "refused":
            job.failures += 1
            router.record_failure(job.provider, now)
            if not job.fallbacks:  # every provider tried: start over from a fresh ranking
                pool = [p.candidate() for p in providers.values()]
                job.fallbacks = [c.peer_id for c in router.choose(pool, job_estimate(job), now)]
            send(job, now)
        elif kind == "reach":
            p = providers[job.provider]
            if p.busy < p.slots:
                start_service(p, job, now)
            else:
                p.queue.append(index)
        elif kind == "served":
            p = providers[job.provider]
            p.busy -= 1
            if p.queue:
                start_service(p, jobs[p.queue.popleft()], now)
            done = now + p.rtt_s / 2
            jitter = p.rtt_s * chance.uniform(0.9, 1.2)
            router.record_success(
                p.name,
                done,
                duration_s=done - job.sent_at,
                completion_tokens=job.completion_tokens,
                first_token_s=job.first_token_at - job.sent_at,
                rtt_sample_s=jitter,
            )
            finished[index] = done - job.arrival
            served_by[p.name] += 1
            cost += (job.prompt_tokens + job.completion_tokens) * p.price_per_1k / 1000
            if mode == "sequential" and index + 1 < n_jobs:
                at(done, "arrive", index + 1)

    times = sorted(finished.values())
    return {
        "jobs": len(times),
        "mean_s": statistics.fmean(times),
        "p50_s": times[len(times) // 2],
        "p95_s": times[int(len(times) * 0.95)],
        "failures": sum(j.failures for j in jobs),
        "mean_cost_nanoton": cost / len(times),
        "share": {name: served_by[name] / len(times) for name in providers},
    }


def plot(results: dict[str, Any], path: Path) -> str | None:
    """Write a bar chart of mean time to finish; the reason if it could not."""
    try:
        import matplotlib  # type: ignore[import-not-found]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found]
    except ImportError:
        return "matplotlib is not installed; plot skipped"
    modes = list(results)
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4))
    for ax, mode in zip(axes if len(modes) > 1 else [axes], modes, strict=True):
        names = list(results[mode])
        ax.bar(names, [results[mode][s]["mean_s"] for s in names])
        ax.set_title(f"{mode}: mean time to finish (s)")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--providers", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--advert-period", type=float, default=DEFAULT_ADVERT_PERIOD_S)
    parser.add_argument("--utilisation", type=float, default=DEFAULT_UTILISATION)
    parser.add_argument("--out", type=Path, default=RESULTS / "routing_sim.json")
    args = parser.parse_args()

    cfg = SimConfig(
        providers=args.providers,
        clients=args.clients,
        advert_period_s=args.advert_period,
        utilisation=args.utilisation,
        seed=args.seed,
    )
    results: dict[str, dict[str, Any]] = {}
    for mode in ("poisson", "sequential"):
        n_jobs = args.jobs if mode == "poisson" else max(1, args.jobs // 5)
        results[mode] = {s.value: simulate(s, mode, n_jobs, cfg) for s in Strategy}
        baseline = results[mode][Strategy.RANDOM.value]["mean_s"]
        for r in results[mode].values():
            r["mean_vs_random"] = r["mean_s"] / baseline

    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_note = plot(results, args.out.with_suffix(".png"))
    report = {
        "config": {
            "providers": [
                {k: v for k, v in vars(p).items() if k not in ("busy", "queue", "published")}
                for p in make_providers(args.providers, random.Random(args.seed))
            ],
            "jobs_poisson": args.jobs,
            "jobs_sequential": max(1, args.jobs // 5),
            "clients_poisson": cfg.clients,
            "utilisation": cfg.utilisation,
            "advert_period_s": cfg.advert_period_s,
            "flaky_failure_rate": FAILURE_RATE,
            "seed": args.seed,
        },
        "results": results,
        "plot": None if plot_note else str(args.out.with_suffix(".png").name),
        "plot_note": plot_note,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for mode, by_strategy in results.items():
        print(f"{mode}:")
        for name, r in by_strategy.items():
            print(
                f"  {name:13s} mean {r['mean_s']:7.2f} s  p95 {r['p95_s']:7.2f} s  "
                f"x{r['mean_vs_random']:.4f} vs random  failures {r['failures']:4d}  "
                f"cost {r['mean_cost_nanoton']:9.0f} nTON"
            )
    if plot_note:
        print(plot_note)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
