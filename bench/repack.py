"""What llama.cpp's extra buffer types (CPU REPACK, and AMX where compiled) are worth.

    .venv/bin/python bench/repack.py [--runs 7] [--tokens 64] [--threads N]

The AMX crash can be avoided two ways (kernels/README.md): build without AMX (REPACK
stays) or load with use_extra_bufts=False (REPACK goes too). This loads the same GGUF
twice on the same build, once each way, and times prompt processing and decode with
runs alternating between the two. Writes bench/results/repack.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import llama_cpp

from meshnode.core.cpu_features import cpu_flags, cpu_model_name
from meshnode.engine.demo_model import find_demo_model, format_prompt
from meshnode.engine.llama import load_llama, system_info
from meshnode.identity import data_dir

RESULTS = Path(__file__).parent / "results"
N_CTX = 2048


def one_run(llm: Any, prompt: str, tokens: int, bias: dict[int, float]) -> dict[str, float]:
    start = time.perf_counter()
    first = 0.0
    n = 0
    for _ in llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, stream=True,
                                   logit_bias=bias):
        n += 1
        if n == 1:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    llm.reset()  # no prefix reuse between runs: prefill is timed every time
    return {"ttft_s": first, "decode_tok_s": (tokens - 1) / (total - first)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    model = find_demo_model(data_dir() / "models")
    prompt = format_prompt(model, "Tell me a short story about a lighthouse keeper. " * 8)
    llms = {
        "extra_bufts_on": load_llama(model.path, n_ctx=N_CTX, n_threads=args.threads,
                                     use_extra_bufts=True),
        "extra_bufts_off": load_llama(model.path, n_ctx=N_CTX, n_threads=args.threads,
                                      use_extra_bufts=False),
    }
    vocab = llms["extra_bufts_on"]._model.vocab
    bias = {t: -100.0 for t in range(llms["extra_bufts_on"].n_vocab())
            if llama_cpp.llama_vocab_is_eog(vocab, t)}
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in llms}
    for llm in llms.values():
        one_run(llm, prompt, 4, bias)  # warm-up: graph set-up, page cache
    for _ in range(args.runs):
        for key, llm in llms.items():
            rows[key].append(one_run(llm, prompt, args.tokens, bias))
    cpuinfo = Path("/proc/cpuinfo").read_text()
    summary: dict[str, Any] = {
        "model": model.name,
        "prompt_tokens": len(llms["extra_bufts_on"].tokenize(prompt.encode(), add_bos=True,
                                                             special=True)),
        "completion_tokens": args.tokens,
        "runs": args.runs,
        "machine": {"cpu": cpu_model_name(cpuinfo), "cores": os.cpu_count(),
                    "isa": sorted(f for f in cpu_flags(cpuinfo)
                                  if f.startswith(("avx", "amx", "fma"))),
                    "platform": platform.platform()},
        "llama_cpp_system_info": system_info(),
    }
    for key, runs in rows.items():
        summary[key] = {
            "ttft_ms": statistics.median(r["ttft_s"] for r in runs) * 1000,
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        }
    on, off = summary["extra_bufts_on"], summary["extra_bufts_off"]
    summary["ratio_on_over_off"] = {"decode_tok_s": on["decode_tok_s"] / off["decode_tok_s"],
                                    "ttft": on["ttft_ms"] / off["ttft_ms"]}
    summary["raw"] = rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "repack.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "raw"}, indent=2))


if __name__ == "__main__":
    main()
