"""Aggregate decode tok/s and per-stream TTFT at 1, 2, 4 and 8 concurrent streams.

    .venv/bin/python bench/batching.py [--tiny] [--levels 1 2 4 8] [--tokens 64]
                                       [--rounds 3] [--threads N] [--skip-llama-server]

Three servers on the same GGUF, the same llama.cpp (llama-server is built from the tree
llama-cpp-python vendors, with our wheel's CPU flags: bench/llama_server_build.py), the
same thread count and greedy sampling, all running at once; rounds alternate between
them so background load slows all three alike:

- meshnode: `meshnode serve --slots 8` (engine runner with continuous batching) and a
  light client in this process, every stream a sealed job over libp2p;
- llama-server `--parallel 8` (continuous batching, unified KV), through its OpenAI
  streaming endpoint;
- `python -m llama_cpp.server` (llama-cpp-python's server: one request at a time).

A round at level N starts N streams at once (different prompts), each asking for
--tokens tokens with end-of-generation banned; aggregate tok/s = all completion tokens /
the round's wall time. Writes bench/results/batching[_tiny][_threadsN].json and a PNG plot
(no suffix for one thread).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llama_server_build import llama_server_path

from meshnode.core.cpu_features import cpu_flags, cpu_model_name
from meshnode.engine.demo_model import find_demo_model, format_prompt
from meshnode.engine.tinymodel import tiny_model_path
from meshnode.identity import data_dir
from meshnode.node import client_node

RESULTS = Path(__file__).parent / "results"
N_CTX = 1024  # per stream: prompt + 64..256 tokens fit
MAX_SLOTS = 8
# A server that is not up after this long will not come up.
START_TIMEOUT_S = 300.0
TOPICS = ("a lighthouse keeper", "a river in winter", "a lost key", "the first snow",
          "an old map", "a quiet library", "a night train", "a garden robot")

Stream = Callable[[int], Awaitable[tuple[float, int]]]
"""(stream index) -> (seconds to first token, completion tokens)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prompts(tiny: bool, model: Any) -> list[str]:
    if tiny:
        return [f"hello {t}" for t in TOPICS]
    return [format_prompt(model, f"Tell me a short story about {t}.") for t in TOPICS]


async def wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
            try:
                if (await http.get(url, timeout=2)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await trio.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


@asynccontextmanager
async def process(argv: list[str], health: str | None, log: Path) -> AsyncIterator[
    subprocess.Popen[bytes]
]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        if health:
            await wait_http(health, proc)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def openai_stream(url: str, model: str, prompts_: list[str], tokens: int,
                  bias: dict[str, float], http: httpx.AsyncClient) -> Stream:
    async def one(i: int) -> tuple[float, int]:
        body = {"model": model, "prompt": prompts_[i % len(prompts_)], "max_tokens": tokens,
                "temperature": 0.0, "stream": True, "logit_bias": bias}
        start = time.perf_counter()
        first = 0.0
        n = 0
        async with http.stream("POST", f"{url}/v1/completions", json=body,
                               timeout=600) as res:
            res.raise_for_status()
            async for line in res.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    n += 1
                    if not first:
                        first = time.perf_counter() - start
        return first, n

    return one


async def round_(stream: Stream, level: int) -> dict[str, Any]:
    ttfts: list[float] = []
    tokens: list[int] = []

    async def run(i: int) -> None:
        first, n = await stream(i)
        ttfts.append(first)
        tokens.append(n)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(level):
            nursery.start_soon(run, i)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "tokens": sum(tokens), "tok_s": sum(tokens) / wall,
            "ttft_s": ttfts}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    cache = data_dir() / "models"
    if args.tiny:
        path, model = tiny_model_path(cache), None
    else:
        model = find_demo_model(cache)
        path = model.path
    texts = prompts(args.tiny, model)
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    logs = Path(tempfile.mkdtemp(prefix="meshnode-batching-"))
    systems: dict[str, Stream] = {}
    async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
        # meshnode
        serve_log = logs / "serve.log"
        home = logs / "home"
        serve = subprocess.Popen(
            [sys.executable, "-m", "meshnode.cli", "serve", "--model", str(path), "--listen",
             "/ip4/127.0.0.1/tcp/0", "--ctx", str(N_CTX), "--slots", str(MAX_SLOTS),
             "--queue", "8", "--threads", str(threads), "--home", str(home)],
            stdout=subprocess.PIPE, stderr=serve_log.open("wb"), text=True,
            env={**os.environ, "COLUMNS": "300"})
        assert serve.stdout is not None
        addr = ""
        for line in serve.stdout:
            if line.startswith("listening"):
                addr = line.split()[1]
                break
        if not addr:
            raise RuntimeError(f"meshnode serve did not start; see {serve_log}")
        client = await nursery.start(_client_task, addr, str(path))
        advert = client["advert"]
        bias_int = {int(k): -100.0 for k in client["eog"]}
        if args.tiny:
            bias_int = client["steady"]
        bias = {str(k): v for k, v in bias_int.items()}

        adverts = [advert]

        async def mesh(i: int) -> tuple[float, int]:
            if i == 0:
                # Re-fetch the advert once per round: a client pinned to one address
                # has no gossip to refresh it, and adverts live 5 minutes.
                adverts[0] = await client["node"].connect(addr)
            res = await client["node"].ask(
                adverts[0], texts[i % len(texts)], max_tokens=args.tokens,
                params={"temperature": 0.0, "logit_bias": bias_int})
            return res.ttft_s, res.usage.completion_tokens

        systems["meshnode"] = mesh
        stack: list[Any] = []
        if not args.skip_llama_server:
            port = free_port()
            binary = llama_server_path()
            cm = process([str(binary), "-m", str(path), "-c", str(N_CTX * MAX_SLOTS),
                          "--parallel", str(MAX_SLOTS), "-t", str(threads), "-tb",
                          str(threads), "--host", "127.0.0.1", "--port", str(port),
                          "--no-webui"],
                         f"http://127.0.0.1:{port}/health", logs / "llama-server.log")
            await cm.__aenter__()
            stack.append(cm)
            systems["llama-server"] = openai_stream(f"http://127.0.0.1:{port}", "m", texts,
                                                    args.tokens, bias, http)
        port2 = free_port()
        cm2 = process([sys.executable, "-m", "llama_cpp.server", "--model", str(path),
                       "--n_ctx", str(N_CTX), "--n_threads", str(threads),
                       "--n_threads_batch", str(threads), "--host", "127.0.0.1",
                       "--port", str(port2), "--interrupt_requests", "False"],
                      f"http://127.0.0.1:{port2}/v1/models", logs / "llama_cpp_server.log")
        await cm2.__aenter__()
        stack.append(cm2)
        systems["llama_cpp.server"] = openai_stream(f"http://127.0.0.1:{port2}", "m", texts,
                                                    args.tokens, bias, http)
        try:
            for stream in systems.values():  # warm-up: graphs, caches
                await round_(stream, 1)
            raw: dict[str, dict[int, list[dict[str, Any]]]] = {
                name: {level: [] for level in args.levels} for name in systems}
            for _ in range(args.rounds):
                for level in args.levels:
                    for name, stream in systems.items():
                        raw[name][level].append(await round_(stream, level))
                        print(f"{name:>16} x{level}: {raw[name][level][-1]['tok_s']:.1f} tok/s",
                              flush=True)
        finally:
            for cm in reversed(stack):
                await cm.__aexit__(None, None, None)
            serve.terminate()
            serve.wait(timeout=30)
            nursery.cancel_scope.cancel()
    summary: dict[str, Any] = {}
    for name, levels in raw.items():
        summary[name] = {}
        for level, rounds in levels.items():
            ttfts = [t for r in rounds for t in r["ttft_s"]]
            summary[name][str(level)] = {
                "tok_s": statistics.median(r["tok_s"] for r in rounds),
                "ttft_p50_ms": pct(ttfts, 0.5) * 1000,
                "ttft_p99_ms": pct(ttfts, 0.99) * 1000,
            }
    return {"summary": summary, "raw": raw, "threads": threads, "model_path": str(path),
            "model": "tiny-llama-random" if args.tiny else model.name if model else "",
            "logs": str(logs)}


async def _client_task(addr: str, model_path: str,
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    import llama_cpp

    from meshnode.engine.llama import steady_bias_for

    async with client_node(allow_insecure=True) as node:
        advert = await node.connect(addr)
        # The tokenizer of the served file, for the same bans the HTTP servers get.
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        from llama_cpp import _internals

        vocab_model = _internals.LlamaModel(path_model=model_path, params=params,
                                            verbose=False)
        vocab = vocab_model.vocab
        n_vocab = vocab_model.n_vocab()
        eog = [t for t in range(n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, t)]
        steady = steady_bias_for(vocab, n_vocab, vocab_model.token_bos())
        task_status.started({"node": node, "advert": advert, "eog": eog, "steady": steady})
        await trio.sleep_forever()


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, levels in result["summary"].items():
        xs = [int(k) for k in levels]
        ax1.plot(xs, [levels[k]["tok_s"] for k in levels], marker="o", label=name)
        ax2.plot(xs, [levels[k]["ttft_p50_ms"] for k in levels], marker="o", label=name)
    ax1.set_xlabel("concurrent streams")
    ax1.set_ylabel("aggregate decode tok/s")
    ax2.set_xlabel("concurrent streams")
    ax2.set_ylabel("TTFT p50 (ms)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['model']} — {result['machine']['cpu']}, "
                 f"{result['threads']} thread(s)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-llama-server", action="store_true")
    args = ap.parse_args()
    if max(args.levels) > MAX_SLOTS:
        raise SystemExit(f"levels above {MAX_SLOTS} would queue, not batch")
    result = trio.run(measure, args)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    result["machine"] = {"cpu": cpu_model_name(cpuinfo), "cores": os.cpu_count(),
                         "isa": sorted(f for f in cpu_flags(cpuinfo)
                                       if f.startswith(("avx", "amx", "fma"))),
                         "platform": platform.platform(), "gpu": "none"}
    s = result["summary"]
    mesh = s["meshnode"]
    result["ratios"] = {
        "meshnode_x4_over_x1": mesh["4"]["tok_s"] / mesh["1"]["tok_s"]
        if "4" in mesh and "1" in mesh else None,
    }
    if "llama-server" in s:
        for level in ("4", "8"):
            if level in mesh:
                result["ratios"][f"meshnode_over_llama_server_x{level}"] = (
                    mesh[level]["tok_s"] / s["llama-server"][level]["tok_s"])
    for level in ("4", "8"):
        if level in mesh:
            result["ratios"][f"meshnode_over_llama_cpp_server_x{level}"] = (
                mesh[level]["tok_s"] / s["llama_cpp.server"][level]["tok_s"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = ("batching_tiny" if args.tiny else "batching") + (
        f"_threads{result['threads']}" if result.get("threads", 1) != 1 else "")
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{name}.png")
    print(json.dumps({"summary": s, "ratios": result["ratios"]}, indent=2))


if __name__ == "__main__":
    main()
