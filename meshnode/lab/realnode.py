"""One real node of a lab run, started inside a network namespace by ``lab real``.

``python -m meshnode.lab.realnode CONFIG.json ROLE INDEX`` runs a bootstrap node, a
provider or a client with the node's own code (``node.provider_node``,
``node.client_node``, ``p2p.discovery.BootstrapNode``) on TCP between namespaces.

Providers run llama.cpp on the generated tiny model, paced to the decode and prompt
speeds of the GPU the scenario gave them (this machine has no GPUs, so hardware speed is
the one thing emulated). Clients wait until they have every provider's advert, then send
their share of the job schedule at the scheduled times and write one record per job.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from meshnode.core.router import Strategy
from meshnode.engine.base import ModelInfo, SamplingParams, TokenChunk, Usage
from meshnode.engine.llama import LlamaEngine, steady_logit_bias
from meshnode.engine.tinymodel import tiny_model_path
from meshnode.identity import NodeIdentity
from meshnode.jobs.routed import NoProvider
from meshnode.node import ProviderSettings, client_node, provider_node
from meshnode.p2p.discovery import BootstrapNode
from meshnode.p2p.host import full_addrs, running_host

LISTEN_PORT = 4001
# The tiny model's own context is 512; prompts and answers of the validation scenario
# stay under it (bench/scenarios/netns_small.toml caps both).
TINY_N_CTX = 512
# Clients wait this long for every provider's advert before starting anyway.
DISCOVERY_WAIT_S = 60.0
_POLL_S = 0.2


class PacedGeneration:
    """Releases a real generation's chunks no faster than ``rate`` tokens/s, counted
    from ``start``, so compute time is absorbed rather than added."""

    def __init__(self, inner: Any, rate: float, start: float) -> None:
        self._inner = inner
        self._rate = rate
        self._start = start
        self._n = 0

    def __aiter__(self) -> PacedGeneration:
        return self

    async def __anext__(self) -> TokenChunk:
        chunk: TokenChunk = await self._inner.__anext__()
        self._n += chunk.n_tokens
        await trio.sleep_until(self._start + self._n / self._rate)
        return chunk

    def ready(self) -> list[TokenChunk]:
        return []

    @property
    def finish_reason(self) -> Any:
        return self._inner.finish_reason

    @property
    def usage(self) -> Usage:
        u: Usage = self._inner.usage
        return u


class PacedEngine:
    """A real LlamaEngine slowed to a GPU's prompt and decode speed."""

    def __init__(self, inner: LlamaEngine, decode_tok_s: float, prompt_tok_s: float) -> None:
        self._inner = inner
        self._decode = decode_tok_s
        self._prompt = prompt_tok_s

    @property
    def info(self) -> ModelInfo:
        return self._inner.info

    @property
    def available(self) -> bool:
        return self._inner.available

    @asynccontextmanager
    async def stream(
        self, prompt: str, params: SamplingParams, max_tokens: int
    ) -> AsyncIterator[PacedGeneration]:
        t0 = trio.current_time()
        prompt_s = await self._inner.count_tokens(prompt) / self._prompt
        async with self._inner.stream(prompt, params, max_tokens) as gen:
            await trio.sleep_until(t0 + prompt_s)
            yield PacedGeneration(gen, self._decode, t0 + prompt_s)

    async def count_tokens(self, text: str) -> int:
        return await self._inner.count_tokens(text)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def run_bootstrap(cfg: dict[str, Any], ip: str) -> None:
    async with running_host(NodeIdentity.generate(), f"/ip4/{ip}/tcp/{LISTEN_PORT}") as host:
        async with trio.open_nursery() as nursery:
            await nursery.start(BootstrapNode(host, [], relay=False).run)
            addr = next(a for a in full_addrs(host) if ip in a)
            out = Path(cfg["workdir"]) / "bootstrap.addr"
            out.with_suffix(".tmp").write_text(addr)
            out.with_suffix(".tmp").replace(out)
            await trio.sleep_forever()


async def run_provider(cfg: dict[str, Any], index: int, ip: str) -> None:
    spec = cfg["providers"][index]
    model = tiny_model_path(Path(cfg["model_dir"]))
    engine = PacedEngine(
        await LlamaEngine.load(model, n_ctx=TINY_N_CTX, n_threads=1),
        spec["decode_tok_s"],
        spec["prompt_tok_s"],
    )
    settings = ProviderSettings(
        listen=f"/ip4/{ip}/tcp/{LISTEN_PORT}",
        slots=cfg["slots"],
        max_queue=cfg["max_queue"],
        price_prompt_per_1k=spec["price_prompt_per_1k"],
        price_completion_per_1k=spec["price_completion_per_1k"],
        tokens_per_s_hint=spec["decode_tok_s"],
        bootstrap=(cfg["bootstrap_addr"],),
    )
    async with provider_node(engine, identity=NodeIdentity.generate(), settings=settings):
        await trio.sleep_forever()


async def run_client(cfg: dict[str, Any], index: int, ip: str) -> None:
    model = tiny_model_path(Path(cfg["model_dir"]))
    raw = await LlamaEngine.load(model, n_ctx=TINY_N_CTX, n_threads=1)
    params = {"temperature": 0.0, "logit_bias": steady_logit_bias(raw)}
    model_id = raw.info.model_id
    await raw.aclose()
    jobs = [j for j in cfg["jobs"] if j["client"] == index]
    records: list[dict[str, Any]] = []
    async with client_node(
        listen=f"/ip4/{ip}/tcp/{LISTEN_PORT}",
        allow_insecure=True,
        strategy=Strategy(cfg["strategy"]),
        bootstrap=(cfg["bootstrap_addr"],),
    ) as node:
        with trio.move_on_after(DISCOVERY_WAIT_S):
            while len(node.directory.providers_for(model_id, time.time())) < len(cfg["providers"]):
                await node.verify_pending()
                await trio.sleep(_POLL_S)
        await node.verify_pending()
        known = len(node.directory.providers_for(model_id, time.time()))
        start = cfg["start_at"]

        async def one(job: dict[str, Any]) -> None:
            await trio.sleep_until(trio.current_time() + max(0.0, start + job["at"] - time.time()))
            t0 = time.time()
            rec: dict[str, Any] = {"job": job["id"], "sent_at": t0 - start}
            try:
                res = await node.jobs.complete(
                    model_id, job["prompt"], max_tokens=job["completion"], params=params
                )
                rec.update(ttft_s=res.ttft_s, finish_s=res.elapsed_s,
                           prompt_tokens=res.usage.prompt_tokens,
                           completion_tokens=res.usage.completion_tokens,
                           providers=res.providers, attempts=len(res.segments))
            except (NoProvider, Exception) as exc:  # a failed job is a data point
                rec.update(error=f"{type(exc).__name__}: {exc}", finish_s=None)
            records.append(rec)

        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(one, job)
    out = Path(cfg["workdir"]) / f"client{index}.json"
    out.write_text(json.dumps({"known_providers": known, "records": records}, indent=1))


def main() -> None:
    cfg_path, role, index_text = sys.argv[1:4]
    cfg = json.loads(Path(cfg_path).read_text())
    index = int(index_text)
    ip = cfg["ips"][role][index]
    if role == "bootstrap":
        trio.run(run_bootstrap, cfg, ip)
    elif role == "provider":
        trio.run(run_provider, cfg, index, ip)
    else:
        trio.run(run_client, cfg, index, ip)


if __name__ == "__main__":
    main()
