"""What one stranger's input costs a provider before admission (issue 13), in one process.

    PYTHONPATH=. .venv/bin/python bench/input_costs.py [--ctx 4096] [--word-kib 16]

Runs against whatever tree is on PYTHONPATH, so the same command on `main` gives the
"before" numbers. Four costs, each the time the node's event loop (or its one thread)
is held:

- log:   one warning whose message holds a `--word-kib` KiB word, through the terminal
         log handler of `meshnode serve` (rich, as set up by `setup_logging`);
- param: building the error for an Open whose sampling-parameter name is 64 KiB;
- bomb:  opening a ~67-byte sealed body that decompresses to 1 MiB of empty lists;
- flood: the longest event-loop stall while the in-process engine counts the tokens of
         "<s>" x 60,000 (180 KB) on a `--ctx` context, and how the count ended.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import msgpack
import trio
import zstandard
from rich.console import Console

import meshnode.cli.common as common
from meshnode.core.crypto import MAX_PLAINTEXT_BYTES, unpack_body
from meshnode.engine.base import SamplingParams
from meshnode.engine.tinymodel import tiny_model_path

TICK_S = 0.01  # the stall probe's period: a stall shorter than this is not seen


def log_cost(word_kib: int) -> dict[str, Any]:
    common.err = Console(file=io.StringIO(), force_terminal=True, width=120)
    common.setup_logging(0)
    log = logging.getLogger("meshnode.bench")
    start = time.perf_counter()
    log.warning("job stream closed: bad_params: unknown sampling parameter(s): %s",
                "k" * (word_kib * 1024))
    return {"word_kib": word_kib, "s": round(time.perf_counter() - start, 4)}


def param_cost() -> dict[str, Any]:
    start = time.perf_counter()
    try:
        SamplingParams.from_dict({"k" * 65536: 1.0})
    except ValueError as exc:
        message = str(exc)
    return {"s": round(time.perf_counter() - start, 5), "error_chars": len(message)}


def bomb_cost(runs: int = 5) -> dict[str, Any]:
    raw = msgpack.packb({"k": "prompt", "prompt": [[] for _ in range(MAX_PLAINTEXT_BYTES - 64)]})
    bomb = b"\x01" + zstandard.ZstdCompressor(level=19).compress(raw)
    outcome = "accepted by the body decoder"
    start = time.perf_counter()
    for _ in range(runs):
        try:
            unpack_body(bomb)
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
    per = (time.perf_counter() - start) / runs
    return {"bomb_bytes": len(bomb), "plaintext_bytes": len(raw),
            "ms_per_decode": round(per * 1000, 3), "outcome": outcome}


async def flood_stall(ctx: int) -> dict[str, Any]:
    from meshnode.engine.llama import LlamaEngine

    path = tiny_model_path(Path.home() / ".cache" / "meshnode" / "bench-models")
    async with await LlamaEngine.load(path, n_ctx=ctx) as engine:
        stall = 0.0
        done = trio.Event()

        async def probe() -> None:
            nonlocal stall
            last = time.perf_counter()
            while not done.is_set():
                await trio.sleep(TICK_S)
                now = time.perf_counter()
                stall = max(stall, now - last - TICK_S)
                last = now

        outcome = ""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe)
            await trio.sleep(2 * TICK_S)
            start = time.perf_counter()
            try:
                outcome = f"{await engine.count_tokens('<s>' * 60_000)} tokens"
            except ValueError as exc:
                outcome = f"{type(exc).__name__}: {str(exc)[:120]}"
            took = time.perf_counter() - start
            await trio.sleep(2 * TICK_S)
            done.set()
    return {"ctx": ctx, "count_s": round(took, 3), "max_loop_stall_s": round(stall, 3),
            "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ctx", type=int, default=4096, help="context (serve's default)")
    parser.add_argument("--word-kib", type=int, default=16)
    args = parser.parse_args()
    result = {
        "log": log_cost(args.word_kib),
        "param": param_cost(),
        "bomb": bomb_cost(),
        "flood": trio.run(flood_stall, args.ctx),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
