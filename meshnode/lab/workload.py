"""The inputs a scenario turns into: providers (city, GPU, last mile, price, sessions),
clients (city, last mile) and jobs (size from a real trace, Poisson arrivals).

Everything is drawn from one seeded ``numpy`` generator, so a scenario and a seed give
the same mesh and the same job list for every strategy compared.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from meshnode.lab.geo import LatencyModel
from meshnode.lab.scenario import Scenario

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]

NANOTON_PER_TON = 1_000_000_000
S_PER_HOUR = 3600.0


@dataclass(frozen=True)
class Mesh:
    """Providers and clients as parallel arrays (index = provider / client number)."""

    latency: LatencyModel
    p_city: Ints
    p_last_mile_ms: Floats
    p_gpu: Ints
    p_decode: Floats  # tok/s per slot
    p_prompt: Floats  # prompt tok/s
    p_price_prompt: Ints  # nanoton per 1k
    p_price_completion: Ints
    c_city: Ints
    c_last_mile_ms: Floats
    gpu_names: tuple[str, ...]

    @property
    def providers(self) -> int:
        return len(self.p_city)

    @property
    def clients(self) -> int:
        return len(self.c_city)

    def rtt_s(self, client: int, provider: int) -> float:
        base = self.latency.base_ms[self.c_city[client], self.p_city[provider]]
        return float(base + self.c_last_mile_ms[client] + self.p_last_mile_ms[provider]) / 1e3

    def rtt_row_s(self, client: int) -> Floats:
        """RTT from one client to every provider."""
        base = self.latency.base_ms[self.c_city[client], self.p_city]
        row: Floats = (base + self.c_last_mile_ms[client] + self.p_last_mile_ms) / 1e3
        return row


@dataclass(frozen=True)
class Jobs:
    arrival: Floats
    client: Ints
    prompt: Ints
    completion: Ints  # tokens the job actually generates (from the trace)
    kind: tuple[str, ...]


def _pick(rng: np.random.Generator, weights: dict[str, float], n: int) -> list[str]:
    names = list(weights)
    p = np.array([weights[k] for k in names], dtype=float)
    return [names[i] for i in rng.choice(len(names), size=n, p=p / p.sum())]


def build_mesh(sc: Scenario, rng: np.random.Generator) -> Mesh:
    cities = tuple(sorted(set(sc.provider_cities) | set(sc.client_cities) | set(sc.proxy_cities)))
    latency = LatencyModel.build(cities, sc.path_inflation)
    n, m = sc.providers, sc.clients
    p_city = np.array([latency.index(c) for c in _pick(rng, sc.provider_cities, n)])
    p_mile = np.array([sc.provider_last_mile_ms[k]
                       for k in _pick(rng, sc.provider_last_mile_share, n)])
    shares = np.array([g.share for g in sc.gpus])
    p_gpu = rng.choice(len(sc.gpus), size=n, p=shares / shares.sum())
    decode = np.array([g.decode_tok_s for g in sc.gpus])[p_gpu]
    prompt = np.array([g.prompt_tok_s for g in sc.gpus])[p_gpu]
    usd_h = np.array([g.usd_per_hour for g in sc.gpus])[p_gpu]
    # Price = what an hour of the GPU costs, spread over the tokens it makes in an hour,
    # times a per-provider margin (lognormal: most near cost, a few far above).
    margin = np.exp(rng.normal(0.0, sc.price_margin_sigma, size=n)) * 1.2
    nanoton_per_s = usd_h / S_PER_HOUR / sc.ton_usd * NANOTON_PER_TON * margin
    price_c = np.maximum(1, np.round(nanoton_per_s / decode * 1000)).astype(np.int64)
    price_p = np.maximum(1, np.round(nanoton_per_s / prompt * 1000)).astype(np.int64)
    c_city = np.array([latency.index(c) for c in _pick(rng, sc.client_cities, m)])
    c_mile = np.array([sc.client_last_mile_ms[k] for k in _pick(rng, sc.client_last_mile_share, m)])
    return Mesh(
        latency=latency,
        p_city=p_city,
        p_last_mile_ms=p_mile,
        p_gpu=p_gpu,
        p_decode=decode,
        p_prompt=prompt,
        p_price_prompt=price_p,
        p_price_completion=price_c,
        c_city=c_city,
        c_last_mile_ms=c_mile,
        gpu_names=tuple(g.name for g in sc.gpus),
    )


def read_trace(sc: Scenario) -> dict[str, tuple[Ints, Ints]]:
    """(prompt tokens, completion tokens) per job kind, from the scenario's trace file."""
    rows: dict[str, tuple[list[int], list[int]]] = {}
    with sc.trace.open() as f:
        lines = (line for line in f if not line.startswith("#"))
        for row in csv.DictReader(lines):
            p, c = rows.setdefault(row["kind"], ([], []))
            p.append(max(1, int(row["prompt_tokens"])))
            c.append(max(1, int(row["completion_tokens"])))
    missing = [k for k in sc.job_kinds if k not in rows]
    if missing:
        raise ValueError(f"trace {sc.trace} has no rows of kind {missing}")
    return {k: (np.array(p), np.array(c)) for k, (p, c) in rows.items()}


def availability(sc: Scenario) -> float:
    """Long-run share of time a provider is online (1 without churn)."""
    if not sc.churn:
        return 1.0
    k = sc.session_weibull_shape
    on = weibull_mean(k, sc.session_median_s)
    off = weibull_mean(k, sc.offline_median_s) if sc.offline_median_s > 0 else 0.0
    return on / (on + off)


def weibull_scale(shape: float, median: float) -> float:
    return float(median / math.log(2) ** (1 / shape))


def weibull_mean(shape: float, median: float) -> float:
    return weibull_scale(shape, median) * math.gamma(1 + 1 / shape)


def build_jobs(
    sc: Scenario, mesh: Mesh, trace: dict[str, tuple[Ints, Ints]], rng: np.random.Generator
) -> tuple[Jobs, float]:
    """Jobs with Poisson arrivals at ``sc.load`` × capacity; also the capacity (jobs/s).

    Capacity is what the online providers can serve of *these* jobs (their sizes after
    the max_tokens cap): Σ slots / mean service time, times the share of providers that
    are online (``availability``)."""
    kinds = _pick(rng, sc.job_kinds, sc.jobs)
    prompt = np.zeros(sc.jobs, dtype=np.int64)
    completion = np.zeros(sc.jobs, dtype=np.int64)
    for kind in sorted(set(kinds)):
        idx = np.array([i for i, k in enumerate(kinds) if k == kind])
        p, c = trace[kind]
        pick = rng.integers(len(p), size=len(idx))
        prompt[idx] = p[pick]
        completion[idx] = np.minimum(c[pick], sc.max_tokens)
    service = prompt.mean() / mesh.p_prompt + completion.mean() / mesh.p_decode
    capacity = float(np.sum(sc.slots / service)) * availability(sc)
    rate = sc.load * capacity
    arrival = np.cumsum(rng.exponential(1.0 / rate, size=sc.jobs))
    client = rng.integers(sc.clients, size=sc.jobs)
    return Jobs(arrival, client, prompt, completion, tuple(kinds)), capacity
