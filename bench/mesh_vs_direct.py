"""Time to first token and decode tok/s: through the mesh vs llama-cpp-python directly.

Same model file, same prompt, same greedy sampling, same token count, same run. The mesh
path is a provider and a light client on 127.0.0.1 (libp2p TCP + Noise + yamux, sealed
job). The baseline is what a user would otherwise run: `llama_cpp.Llama.create_completion`
with `stream=True` in-process.

    .venv/bin/python bench/mesh_vs_direct.py [--tiny] [--runs 5] [--tokens 64]

Writes bench/results/mesh_vs_direct[_tiny][_same_process].json. By default the provider is a
`meshnode serve` process, as users run it; --same-process puts both halves in this process.
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
from pathlib import Path
from typing import Any

import llama_cpp
import trio

from meshnode.engine.demo_model import find_demo_model, format_prompt
from meshnode.engine.llama import LlamaEngine
from meshnode.engine.tinymodel import tiny_model_path
from meshnode.identity import NodeIdentity, data_dir
from meshnode.node import client_node, provider_node

RESULTS = Path(__file__).parent / "results"
N_CTX = 2048
BANNED = -100.0


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


async def _client_runs(
    addr: str, prompt: str, tokens: int, runs: int, bias: dict[int, float]
) -> list[dict[str, float]]:
    out = []
    async with client_node(allow_insecure=True) as client:
        advert = await client.connect(addr)
        params = {"temperature": 0.0, "logit_bias": bias}
        await client.ask(advert, prompt, max_tokens=4, params=params)  # warm-up
        for _ in range(runs):
            res = await client.ask(advert, prompt, max_tokens=tokens, params=params)
            decode_s = res.elapsed_s - res.ttft_s
            out.append(
                {
                    "ttft_s": res.ttft_s,
                    "total_s": res.elapsed_s,
                    "tokens": res.usage.completion_tokens,
                    "decode_tok_s": (res.usage.completion_tokens - 1) / decode_s,
                }
            )
    return out


async def mesh_runs_same_process(
    path: Path, prompt: str, tokens: int, runs: int, bias: dict[int, float]
) -> list[dict[str, float]]:
    """Provider and client in this process: they share one GIL with the decode thread."""
    engine = await LlamaEngine.load(path, n_ctx=N_CTX)
    try:
        async with provider_node(engine, identity=NodeIdentity.generate()) as prov:
            return await _client_runs(prov.addrs[0], prompt, tokens, runs, bias)
    finally:
        await engine.aclose()


def mesh_runs_two_processes(
    path: Path, prompt: str, tokens: int, runs: int, bias: dict[int, float]
) -> list[dict[str, float]]:
    """The provider as users run it: `meshnode serve` in its own process."""
    with tempfile.TemporaryDirectory() as home, subprocess.Popen(
        [sys.executable, "-m", "meshnode.cli", "serve", "--model", str(path), "--listen",
         "/ip4/127.0.0.1/tcp/0", "--ctx", str(N_CTX), "--home", home],
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
            return trio.run(_client_runs, addr, prompt, tokens, runs, bias)
        finally:
            serve.terminate()
            serve.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="use the generated tiny model")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--same-process", action="store_true",
                    help="run provider and client in this process (they share the GIL)")
    args = ap.parse_args()

    cache = data_dir() / "models"
    if args.tiny:
        path, name, prompt = tiny_model_path(cache), "tiny-llama-random", "hello world"
    else:
        model = find_demo_model(cache)
        path, name = model.path, model.name
        prompt = format_prompt(model, "Tell me a short story about a lighthouse keeper.")

    llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_batch=512, verbose=False)
    bias = _no_eog_bias(llm)
    if args.tiny:
        from meshnode.engine.llama import steady_logit_bias

        bias = steady_logit_bias(llm)

    direct_run(llm, prompt, 4, bias)  # warm-up
    direct = []
    for _ in range(args.runs):
        r = direct_run(llm, prompt, args.tokens, bias)
        r["decode_tok_s"] = (args.tokens - 1) / (r["total_s"] - r["ttft_s"])
        direct.append(r)
    if args.same_process:
        mesh = trio.run(mesh_runs_same_process, path, prompt, args.tokens, args.runs, bias)
    else:
        mesh = mesh_runs_two_processes(path, prompt, args.tokens, args.runs, bias)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    summary: dict[str, Any] = {
        "model": name,
        "model_path": str(path),
        "prompt_tokens": len(llm.tokenize(prompt.encode(), add_bos=True, special=True)),
        "completion_tokens": args.tokens,
        "runs": args.runs,
        "layout": "one process" if args.same_process else "provider = `meshnode serve` process",
        "machine": {"cpu_count": __import__("os").cpu_count(), "platform": platform.platform()},
        "direct": {
            "ttft_ms": med(direct, "ttft_s") * 1000,
            "decode_tok_s": med(direct, "decode_tok_s"),
        },
        "mesh": {"ttft_ms": med(mesh, "ttft_s") * 1000, "decode_tok_s": med(mesh, "decode_tok_s")},
        "raw": {"direct": direct, "mesh": mesh},
    }
    summary["ratio_mesh_over_direct"] = {
        "ttft": summary["mesh"]["ttft_ms"] / summary["direct"]["ttft_ms"],
        "decode_tok_s": summary["mesh"]["decode_tok_s"] / summary["direct"]["decode_tok_s"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = ("_tiny" if args.tiny else "") + ("_same_process" if args.same_process else "")
    (RESULTS / f"mesh_vs_direct{suffix}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "raw"}, indent=2))


if __name__ == "__main__":
    main()
