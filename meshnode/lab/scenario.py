"""Scenario files: one TOML file describes a mesh, its workload and where each number
comes from. ``load_scenario`` checks every field and says which one is wrong.

See ``bench/scenarios/*.toml`` for commented examples and the README's "Routing lab"
section for the meaning of each table.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from meshnode.core.advert import MAX_ADVERT_LIFETIME_S
from meshnode.core.directory import DEFAULT_MAX_ENTRIES, RATE_PER_S
from meshnode.core.router import MAX_PROBE_SHARE, P2C_SCORE_CUTOFF
from meshnode.jobs.routed import DEFAULT_MAX_ATTEMPTS
from meshnode.lab.geo import CITIES
from meshnode.node import ADVERT_LIFETIME_S
from meshnode.p2p.discovery import LOAD_PUBLISH_MIN_INTERVAL_S
from meshnode.p2p.host import DIAL_TIMEOUT_S

# A scenario is a research input, not a trust boundary; the limits only catch typos
# (a million clients by an extra zero) before they cost an hour of CPU.
MAX_PROVIDERS = 100_000
MAX_CLIENTS = 100_000
MAX_JOBS = 10_000_000
MAX_ATTEMPTS = 64  # a job offered to more providers than this is a typo, not an experiment
MAX_LOAD = 2.0  # beyond twice the capacity every strategy just queues without bound


class ScenarioError(ValueError):
    """The scenario file is missing a field or has one out of range."""


@dataclass(frozen=True)
class Gpu:
    name: str
    share: float  # fraction of providers with this GPU
    decode_tok_s: float  # llama.cpp tg speed, one sequence
    prompt_tok_s: float  # llama.cpp pp speed
    usd_per_hour: float  # what renting it costs: the provider's price floor


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    seed: int
    providers: int
    clients: int
    jobs: int
    load: float
    warmup_fraction: float
    directory_max_entries: int
    max_tokens: int
    strategies: tuple[str, ...]
    path_inflation: float
    provider_cities: dict[str, float]
    client_cities: dict[str, float]
    provider_last_mile_ms: dict[str, float]
    provider_last_mile_share: dict[str, float]
    client_last_mile_ms: dict[str, float]
    client_last_mile_share: dict[str, float]
    gossip_hop_processing_ms: float
    gpus: tuple[Gpu, ...]
    slots: int
    max_queue: int
    price_margin_sigma: float
    ton_usd: float
    session_weibull_shape: float
    session_median_s: float
    offline_median_s: float
    trace: Path
    job_kinds: dict[str, float]
    proxy_cities: tuple[str, ...]
    sources: dict[str, str]
    # What-if knobs: the node's own values unless the scenario's [what_if] sets them.
    dial_timeout_s: float = DIAL_TIMEOUT_S
    advert_lifetime_s: float = ADVERT_LIFETIME_S
    load_publish_interval_s: float = LOAD_PUBLISH_MIN_INTERVAL_S
    # py-libp2p's happy-eyeballs wait before every dial (DESIGN.md)
    dial_delay_s: float = 0.25
    p2c_score_cutoff: float = P2C_SCORE_CUTOFF  # core.router
    max_probe_share: float = MAX_PROBE_SHARE  # core.router
    spread_probes: bool = True  # core.router.Router.spread_probes
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # jobs.routed: providers a job is offered to
    directory_rate_per_s: float = RATE_PER_S  # core.directory: adverts a peer may send
    real: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def with_overrides(self, **changes: Any) -> Scenario:
        return replace(self, **changes)

    @property
    def churn(self) -> bool:
        return self.session_median_s > 0


def _get(table: dict[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise ScenarioError(f"[{where}] lacks {key!r}")
    return table[key]


def _bool(table: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise ScenarioError(f"[{where}] {key} must be true or false")
    return value


def _number(table: dict[str, Any], key: str, where: str, lo: float, hi: float) -> float:
    value = _get(table, key, where)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScenarioError(f"[{where}] {key} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise ScenarioError(f"[{where}] {key}={value} outside [{lo}, {hi}]")
    return float(value)


def _int(table: dict[str, Any], key: str, where: str, lo: int, hi: int) -> int:
    value = _get(table, key, where)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(f"[{where}] {key} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ScenarioError(f"[{where}] {key}={value} outside [{lo}, {hi}]")
    return value


def _weights(
    table: dict[str, Any], key: str, where: str, known: set[str] | None
) -> dict[str, float]:
    value = _get(table, key, where)
    if not isinstance(value, dict) or not value:
        raise ScenarioError(f"[{where}] {key} must be a non-empty table of name = weight")
    out = {}
    for name, w in value.items():
        if known is not None and name not in known:
            raise ScenarioError(f"[{where}] {key}: unknown name {name!r}")
        if isinstance(w, bool) or not isinstance(w, int | float) or w < 0:
            raise ScenarioError(f"[{where}] {key}.{name} must be a weight >= 0")
        out[name] = float(w)
    if sum(out.values()) <= 0:
        raise ScenarioError(f"[{where}] {key}: weights sum to zero")
    return out


def load_scenario(path: Path) -> Scenario:
    """Parse and check a scenario file; ``ScenarioError`` names the first bad field."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc}") from exc
    return parse_scenario(raw, base=path.parent, path=path)


def parse_scenario(raw: dict[str, Any], *, base: Path, path: Path | None = None) -> Scenario:
    meta, mesh, lat = raw.get("scenario", {}), raw.get("mesh", {}), raw.get("latency", {})
    prov, churn, jobs = raw.get("providers", {}), raw.get("churn", {}), raw.get("jobs", {})
    cities = set(CITIES)
    gpus = []
    for i, g in enumerate(raw.get("gpus", [])):
        where = f"gpus.{i}"
        gpus.append(
            Gpu(
                name=str(_get(g, "name", where)),
                share=_number(g, "share", where, 0.0, 1.0),
                decode_tok_s=_number(g, "decode_tok_s", where, 0.01, 1e6),
                prompt_tok_s=_number(g, "prompt_tok_s", where, 0.01, 1e7),
                usd_per_hour=_number(g, "usd_per_hour", where, 0.0, 1e4),
            )
        )
    if not gpus or sum(g.share for g in gpus) <= 0:
        raise ScenarioError("[[gpus]] must list at least one GPU with a share > 0")
    trace = base / str(_get(jobs, "trace", "jobs"))
    if not trace.is_file():
        raise ScenarioError(f"[jobs] trace {trace} does not exist")
    oracle, what_if = raw.get("oracle", {}), raw.get("what_if", {})
    proxies = tuple(str(c) for c in oracle.get("proxy_cities", []))
    if any(c not in cities for c in proxies):
        raise ScenarioError(f"[oracle] proxy_cities: unknown city in {proxies}")
    sources = raw.get("sources", {})
    if not isinstance(sources, dict) or not sources:
        raise ScenarioError("[sources] must cite where the inputs come from")
    strategies = tuple(str(s) for s in mesh.get("strategies", ()))
    return Scenario(
        name=str(_get(meta, "name", "scenario")),
        description=str(meta.get("description", "")),
        seed=_int(meta, "seed", "scenario", 0, 2**32 - 1),
        providers=_int(mesh, "providers", "mesh", 1, MAX_PROVIDERS),
        clients=_int(mesh, "clients", "mesh", 1, MAX_CLIENTS),
        jobs=_int(mesh, "jobs", "mesh", 1, MAX_JOBS),
        load=_number(mesh, "load", "mesh", 0.01, MAX_LOAD),
        warmup_fraction=_number(mesh, "warmup_fraction", "mesh", 0.0, 0.9),
        directory_max_entries=int(mesh.get("directory_max_entries", DEFAULT_MAX_ENTRIES)),
        max_tokens=_int(mesh, "max_tokens", "mesh", 1, 1 << 20),
        strategies=strategies,
        path_inflation=_number(lat, "path_inflation", "latency", 1.0, 10.0),
        provider_cities=_weights(lat, "provider_cities", "latency", cities),
        client_cities=_weights(lat, "client_cities", "latency", cities),
        provider_last_mile_ms=_weights(lat, "provider_last_mile_ms", "latency", None),
        provider_last_mile_share=_weights(lat, "provider_last_mile_share", "latency", None),
        client_last_mile_ms=_weights(lat, "client_last_mile_ms", "latency", None),
        client_last_mile_share=_weights(lat, "client_last_mile_share", "latency", None),
        gossip_hop_processing_ms=_number(lat, "gossip_hop_processing_ms", "latency", 0.0, 1e4),
        gpus=tuple(gpus),
        slots=_int(prov, "slots", "providers", 1, 1024),
        max_queue=_int(prov, "max_queue", "providers", 0, 1 << 20),
        price_margin_sigma=_number(prov, "price_margin_sigma", "providers", 0.0, 5.0),
        ton_usd=_number(prov, "ton_usd", "providers", 1e-6, 1e6),
        session_weibull_shape=_number(churn, "session_weibull_shape", "churn", 0.05, 10.0),
        session_median_s=_number(churn, "session_median_s", "churn", 0.0, 1e9),
        offline_median_s=_number(churn, "offline_median_s", "churn", 0.0, 1e9),
        trace=trace,
        job_kinds=_weights(jobs, "kinds", "jobs", {"conv", "code"}),
        proxy_cities=proxies,
        sources={str(k): str(v) for k, v in sources.items()},
        dial_timeout_s=(_number(what_if, "dial_timeout_s", "what_if", 0.01, 600.0)
                        if "dial_timeout_s" in what_if else DIAL_TIMEOUT_S),
        advert_lifetime_s=(
            _number(what_if, "advert_lifetime_s", "what_if", 1.0, MAX_ADVERT_LIFETIME_S)
            if "advert_lifetime_s" in what_if else ADVERT_LIFETIME_S
        ),
        load_publish_interval_s=(
            _number(what_if, "load_publish_interval_s", "what_if", 0.0, 3600.0)
            if "load_publish_interval_s" in what_if else LOAD_PUBLISH_MIN_INTERVAL_S
        ),
        dial_delay_s=(_number(what_if, "dial_delay_s", "what_if", 0.0, 60.0)
                      if "dial_delay_s" in what_if else 0.25),
        p2c_score_cutoff=(_number(what_if, "p2c_score_cutoff", "what_if", 1.0, 100.0)
                          if "p2c_score_cutoff" in what_if else P2C_SCORE_CUTOFF),
        max_probe_share=(_number(what_if, "max_probe_share", "what_if", 0.0, 1.0)
                         if "max_probe_share" in what_if else MAX_PROBE_SHARE),
        directory_rate_per_s=(
            _number(what_if, "directory_rate_per_s", "what_if", 0.001, 1000.0)
            if "directory_rate_per_s" in what_if else RATE_PER_S
        ),
        spread_probes=_bool(what_if, "spread_probes", "what_if", True),
        max_attempts=(_int(what_if, "max_attempts", "what_if", 1, MAX_ATTEMPTS)
                      if "max_attempts" in what_if else DEFAULT_MAX_ATTEMPTS),
        real=dict(raw.get("real", {})),
        path=path,
    )
