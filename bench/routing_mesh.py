"""Routing strategies on a real loopback mesh: 3 providers of different speeds.

Each provider is a real `provider_node` (libp2p host, sealed job protocol, llama.cpp on the
generated tiny model); their speeds differ because each engine is paced to a fixed decode
rate (this machine has one CPU type and no GPUs, so hardware differences are emulated by
pacing, the only fake here). One light client runs N sequential jobs per strategy and we
record which provider served each job and how long it took to finish.

    .venv/bin/python bench/routing_mesh.py [--jobs 50] [--tokens 48]

Writes bench/results/routing_mesh.json; ratios compare each strategy's mean time to
finish with `random`, the baseline a user without a router would get.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from meshnode.core.router import Strategy
from meshnode.engine.base import ModelInfo, SamplingParams, TokenChunk, Usage
from meshnode.engine.llama import LlamaEngine, steady_logit_bias
from meshnode.engine.tinymodel import tiny_model_path
from meshnode.identity import NodeIdentity
from meshnode.node import ProviderSettings, client_node, provider_node

RESULTS = Path(__file__).parent / "results"
# (tokens/s, nanoton per 1k completion tokens): fast and dear, medium, slow and cheap.
PROVIDERS = [(400.0, 3000), (150.0, 2000), (40.0, 1000)]


class _PacedGeneration:
    def __init__(self, inner: Any, rate: float) -> None:
        self._inner = inner
        self._rate = rate

    def __aiter__(self) -> _PacedGeneration:
        return self

    async def __anext__(self) -> TokenChunk:
        chunk: TokenChunk = await self._inner.__anext__()
        await trio.sleep(chunk.n_tokens / self._rate)
        return chunk

    def ready(self) -> list[TokenChunk]:
        return []  # paced: every chunk waits its turn

    @property
    def finish_reason(self) -> Any:
        return self._inner.finish_reason

    @property
    def usage(self) -> Usage:
        u: Usage = self._inner.usage
        return u


class PacedEngine:
    """A real LlamaEngine whose output is released at a fixed rate (emulated hardware)."""

    def __init__(self, inner: LlamaEngine, rate: float) -> None:
        self._inner = inner
        self._rate = rate

    @property
    def info(self) -> ModelInfo:
        return self._inner.info

    @property
    def available(self) -> bool:
        return self._inner.available

    @asynccontextmanager
    async def stream(
        self, prompt: str, params: SamplingParams, max_tokens: int
    ) -> AsyncIterator[_PacedGeneration]:
        async with self._inner.stream(prompt, params, max_tokens) as gen:
            yield _PacedGeneration(gen, self._rate)

    async def count_tokens(self, text: str) -> int:
        return await self._inner.count_tokens(text)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def run(jobs: int, tokens: int) -> dict[str, Any]:
    path = tiny_model_path(Path(tempfile.gettempdir()) / "meshnode-bench-models")
    results: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        provs = []
        for rate, price in PROVIDERS:
            engine = PacedEngine(await LlamaEngine.load(path, n_ctx=512), rate)
            settings = ProviderSettings(price_completion_per_1k=price, tokens_per_s_hint=rate)
            prov = await stack.enter_async_context(
                provider_node(engine, identity=NodeIdentity.generate(), settings=settings)
            )
            provs.append((prov, rate))
        raw = await LlamaEngine.load(path, n_ctx=512)
        params = {"temperature": 0.0, "logit_bias": steady_logit_bias(raw)}
        await raw.aclose()
        model_id = provs[0][0].engine.info.model_id
        speed_of = {p.peer_id: rate for p, rate in provs}
        for strategy in Strategy:
            async with client_node(allow_insecure=True, strategy=strategy) as client:
                for prov, _ in provs:
                    await client.connect(prov.addrs[0])
                times, served = [], []
                for i in range(jobs):
                    t0 = time.perf_counter()
                    res = await client.complete(
                        model_id, f"job {i}", max_tokens=tokens, params=params
                    )
                    times.append(time.perf_counter() - t0)
                    served.append(res.segments[-1].provider)
            share = {
                f"{speed_of[pid]:.0f} tok/s": served.count(pid) / jobs for pid in speed_of
            }
            results[strategy.value] = {
                "mean_time_to_finish_s": statistics.mean(times),
                "p95_time_to_finish_s": sorted(times)[int(0.95 * (jobs - 1))],
                "share": share,
            }
            print(strategy.value, json.dumps(results[strategy.value]))
    base = results["random"]["mean_time_to_finish_s"]
    for r in results.values():
        r["mean_ratio_vs_random"] = r["mean_time_to_finish_s"] / base
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=48)
    args = ap.parse_args()
    results = trio.run(run, args.jobs, args.tokens)
    out = {
        "setup": {
            "providers": [{"tokens_per_s": r, "price_completion_per_1k": p} for r, p in PROVIDERS],
            "jobs_per_strategy": args.jobs,
            "completion_tokens": args.tokens,
            "model": "tiny random llama (generated), paced per provider",
        },
        "strategies": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "routing_mesh.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'routing_mesh.json'}")


if __name__ == "__main__":
    main()
