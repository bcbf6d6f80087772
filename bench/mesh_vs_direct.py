"""Time to first token and decode tok/s: through the mesh vs llama-cpp-python directly.

Same model file, same prompt, same greedy sampling, same token count, same run. The mesh
path is a provider and a light client on 127.0.0.1 (libp2p TCP + Noise + yamux, sealed
job). The baseline is what a user would otherwise run: `llama_cpp.Llama.create_completion`
with `stream=True` in-process.

    .venv/bin/python bench/mesh_vs_direct.py [--tiny] [--runs 5] [--tokens 64]

Writes bench/results/mesh_vs_direct[_tiny][_same_process].json. By default the provider is a
`meshnode serve` process, as users run it; --same-process puts the provider node in this
process. Either way llama.cpp runs in the provider's supervised engine runner. A third row,
"runner", streams from a runner with no mesh in between: what the runner itself costs.
Runs alternate between the three paths so background load slows them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import llama_cpp
import trio

from meshnode.core.advert import Advert
from meshnode.core.cpu_features import cpu_flags, cpu_model_name
from meshnode.engine.base import SamplingParams
from meshnode.engine.demo_model import find_demo_model, format_prompt
from meshnode.engine.llama import host_load_plan, load_llama, system_info
from meshnode.engine.supervised import RunnerConfig, SupervisedEngine, open_supervised_engine
from meshnode.engine.tinymodel import tiny_model_path
from meshnode.identity import NodeIdentity, data_dir
from meshnode.node import ClientNode, client_node, provider_node
from meshnode.serving import default_gpu_layers

RESULTS = Path(__file__).parent / "results"
N_CTX = 2048
BANNED = -100.0
# Pause before each timed runner run. The direct run blocks this process's trio
# loop (~80 ms for 200 tiny tokens), so the client node's work left waiting from the
# last mesh job (such as opening its spare job stream) ran inside the next runner run's
# time to first token: its stream() took 3-4 ms to send one frame (tiny runner row on
# main: 3.5 ms without the pause, 2.2 ms with it).
SETTLE_S = 0.05


def _no_eog_bias(llm: llama_cpp.Llama) -> dict[int, float]:
    vocab = llm._model.vocab
    return {
        t: BANNED for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)
    }


def direct_run(
    llm: llama_cpp.Llama, prompt: str, tokens: int, bias: dict[int, float]
) -> dict[str, float]:
    start = time.perf_counter()
    first = 0.0
    n = 0
    for _ in llm.create_completion(
        prompt, max_tokens=tokens, temperature=0.0, stream=True, logit_bias=bias
    ):
        n += 1
        if n == 1:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    # Chunks ≈ tokens for llama-cpp-python's stream; count tokens exactly by re-tokenizing.
    return {"ttft_s": first, "total_s": total, "chunks": n}


def _stats(res_ttft: float, res_total: float, tokens: int) -> dict[str, float]:
    return {"ttft_s": res_ttft, "total_s": res_total, "tokens": tokens,
            "decode_tok_s": (tokens - 1) / max(res_total - res_ttft, 1e-9)}


async def runner_run(engine: SupervisedEngine, prompt: str, tokens: int,
                     bias: dict[int, float]) -> dict[str, float]:
    """The engine runner alone (no mesh): what the child process costs per token."""
    params = SamplingParams(temperature=0.0, logit_bias=bias)
    start = time.perf_counter()
    first = 0.0
    async with engine.stream(prompt, params, tokens) as gen:
        async for _ in gen:
            if not first:
                first = time.perf_counter() - start
    return _stats(first, time.perf_counter() - start, gen.usage.completion_tokens)


async def mesh_run(client: ClientNode, advert: Advert, prompt: str, tokens: int,
                   bias: dict[int, float]) -> dict[str, float]:
    res = await client.ask(advert, prompt, max_tokens=tokens,
                           params={"temperature": 0.0, "logit_bias": bias})
    return _stats(res.ttft_s, res.elapsed_s, res.usage.completion_tokens)


@asynccontextmanager
async def serve_process(path: Path, layers: int) -> AsyncIterator[str]:
    """The provider as users run it: `meshnode serve` (with its engine runner)."""
    with tempfile.TemporaryDirectory() as home, subprocess.Popen(
        [sys.executable, "-m", "meshnode.cli", "serve", "--model", str(path), "--listen",
         "/ip4/127.0.0.1/tcp/0", "--ctx", str(N_CTX), "--home", home,
         "--n-gpu-layers", str(layers)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "COLUMNS": "300"},
    ) as serve:
        try:
            assert serve.stdout is not None
            addr = ""
            for line in serve.stdout:
                if line.startswith("listening"):
                    addr = line.split()[1]
                    break
            if not addr:
                raise RuntimeError("meshnode serve exited before listening")
            yield addr
        finally:
            serve.terminate()
            serve.wait(timeout=30)


@asynccontextmanager
async def serve_same_process(path: Path, layers: int) -> AsyncIterator[str]:
    """Provider node in this process (its engine runner is still a child process)."""
    async with (
        open_supervised_engine(RunnerConfig(model=path, n_ctx=N_CTX,
                                            n_gpu_layers=layers)) as engine,
        provider_node(engine, identity=NodeIdentity.generate()) as prov,
    ):
        yield prov.addrs[0]


async def measure(path: Path, llm: Any, prompt: str, tokens: int, runs: int,
                  bias: dict[int, float], same_process: bool, layers: int
                  ) -> dict[str, list[dict[str, float]]]:
    """Runs alternate direct / runner / mesh, so a busy machine slows all three alike."""
    rows: dict[str, list[dict[str, float]]] = {"direct": [], "runner": [], "mesh": []}
    serve = serve_same_process if same_process else serve_process
    async with (
        serve(path, layers) as addr,
        open_supervised_engine(RunnerConfig(model=path, n_ctx=N_CTX,
                                            n_gpu_layers=layers)) as engine,
        client_node(allow_insecure=True) as client,
    ):
        advert = await client.connect(addr)
        direct_run(llm, prompt, 4, bias)  # warm-ups
        await runner_run(engine, prompt, 4, bias)
        await mesh_run(client, advert, prompt, 4, bias)
        for _ in range(runs):
            r = direct_run(llm, prompt, tokens, bias)
            rows["direct"].append(_stats(r["ttft_s"], r["total_s"], tokens))
            await trio.sleep(SETTLE_S)
            rows["runner"].append(await runner_run(engine, prompt, tokens, bias))
            rows["mesh"].append(await mesh_run(client, advert, prompt, tokens, bias))
        # How many mesh jobs started on a spare job stream (no stream open before Open).
        streams = client.job_streams
        rows["job_streams"] = [{"spares_used": streams.spares_used,
                                "opened_for_jobs": streams.opened}]
    return rows


def _cpu() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = cpu_flags(cpuinfo)
    return {"model": cpu_model_name(cpuinfo), "cores": os.cpu_count(),
            "isa": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))),
            "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="use the generated tiny model")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--same-process", action="store_true",
                    help="provider node in this process (its runner is still a child)")
    ap.add_argument("--n-gpu-layers", type=int, default=None,
                    help="layers on the GPU for all paths (default: all on a CUDA build)")
    ap.add_argument("--out", default=None, help="result file name (default from the options)")
    args = ap.parse_args()
    layers = default_gpu_layers() if args.n_gpu_layers is None else args.n_gpu_layers

    cache = data_dir() / "models"
    if args.tiny:
        path, name, prompt = tiny_model_path(cache), "tiny-llama-random", "hello world"
    else:
        model = find_demo_model(cache)
        path, name = model.path, model.name
        prompt = format_prompt(model, "Tell me a short story about a lighthouse keeper.")

    # The baseline loads exactly as the runner does (same AMX-safe plan), in this process.
    llm = load_llama(path, n_ctx=N_CTX, n_gpu_layers=layers)
    bias = _no_eog_bias(llm)
    if args.tiny:
        from meshnode.engine.llama import steady_logit_bias

        bias = steady_logit_bias(llm)
    rows = trio.run(measure, path, llm, prompt, args.tokens, args.runs, bias, args.same_process,
                    layers)

    def med(key: str, field: str) -> float:
        return statistics.median(r[field] for r in rows[key])

    summary: dict[str, Any] = {
        "model": name,
        "model_path": str(path),
        "prompt_tokens": len(llm.tokenize(prompt.encode(), add_bos=True, special=True)),
        "completion_tokens": args.tokens,
        "runs": args.runs,
        "layout": "provider node in this process" if args.same_process
        else "provider = `meshnode serve` process",
        "engine": "llama.cpp in a supervised runner process (mesh and runner rows)",
        "load_plan": host_load_plan().reason,
        "n_gpu_layers": layers,
        "llama_cpp_system_info": system_info(),
        "machine": _cpu(),
    }
    summary["mesh_job_streams"] = rows.pop("job_streams")[0]
    for key in rows:
        summary[key] = {"ttft_ms": med(key, "ttft_s") * 1000,
                        "decode_tok_s": med(key, "decode_tok_s")}
    d = summary["direct"]
    for key in ("runner", "mesh"):
        summary[f"ratio_{key}_over_direct"] = {
            "ttft": summary[key]["ttft_ms"] / d["ttft_ms"],
            "ttft_added_ms": summary[key]["ttft_ms"] - d["ttft_ms"],
            "decode_tok_s": summary[key]["decode_tok_s"] / d["decode_tok_s"],
            "added_us_per_token": (1 / summary[key]["decode_tok_s"]
                                   - 1 / d["decode_tok_s"]) * 1e6,
        }
    summary["raw"] = rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ("_tiny" if args.tiny else "") + ("_same_process" if args.same_process else "")
    out = RESULTS / (args.out or f"mesh_vs_direct{suffix}.json")
    out.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "raw"}, indent=2))


if __name__ == "__main__":
    main()
