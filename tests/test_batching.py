"""Continuous batching in the engine runner: several jobs share one llama.cpp context.

Real runner processes over the tiny F32 model, where batched arithmetic gives exactly
the single-job text (bench/batching.py measures how far Gemma differs)."""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

import trio

from meshnode.engine.base import SamplingParams
from meshnode.engine.batched import PREFILL_CHUNK_WHILE_DECODING
from meshnode.engine.supervised import RunnerConfig, SupervisedEngine, open_supervised_engine

PROMPTS = ("the river", "once upon a time", "hello world", "a quiet house")
CTX = 2048


def runner(model: Path, slots: int) -> RunnerConfig:
    return RunnerConfig(model=model, n_ctx=CTX, slots=slots)


async def generate(engine: SupervisedEngine, prompt: str, max_tokens: int,
                   bias: dict[int, float], stamps: list[float] | None = None,
                   stop_after: int | None = None) -> str:
    params = SamplingParams(temperature=0.0, logit_bias=bias)
    text = ""
    async with engine.stream(prompt, params, max_tokens) as gen:
        async for chunk in gen:
            text += chunk.text
            if stamps is not None:
                stamps.append(time.perf_counter())
            if stop_after is not None and len(text) >= stop_after:
                break
    return text


async def alone(model: Path, max_tokens: int, prompts: tuple[str, ...] = PROMPTS
                ) -> tuple[dict[str, str], dict[int, float]]:
    async with open_supervised_engine(runner(model, 1)) as engine:
        bias = await engine.steady_logit_bias()
        return {p: await generate(engine, p, max_tokens, bias) for p in prompts}, bias


async def test_four_concurrent_greedy_jobs_each_match_the_job_alone(
    tiny_gguf_path: Path,
) -> None:
    expected, bias = await alone(tiny_gguf_path, 120)
    got: dict[str, str] = {}
    async with open_supervised_engine(runner(tiny_gguf_path, 4)) as engine:
        assert engine.slots == 4

        async def one(prompt: str) -> None:
            got[prompt] = await generate(engine, prompt, 120, bias)

        async with trio.open_nursery() as nursery:
            for prompt in PROMPTS:
                nursery.start_soon(one, prompt)
    assert got == expected


async def test_cancelling_one_stream_leaves_the_others_text_unchanged(
    tiny_gguf_path: Path,
) -> None:
    expected, bias = await alone(tiny_gguf_path, 150)
    got: dict[str, str] = {}
    async with open_supervised_engine(runner(tiny_gguf_path, 4)) as engine:

        async def one(prompt: str) -> None:
            quitter = prompt == PROMPTS[0]
            got[prompt] = await generate(engine, prompt, 150, bias,
                                         stop_after=20 if quitter else None)

        async with trio.open_nursery() as nursery:
            for prompt in PROMPTS:
                nursery.start_soon(one, prompt)
    assert got[PROMPTS[0]] == expected[PROMPTS[0]][: len(got[PROMPTS[0]])]
    assert len(got[PROMPTS[0]]) < len(expected[PROMPTS[0]])
    for prompt in PROMPTS[1:]:
        assert got[prompt] == expected[prompt]


async def test_a_long_prompt_arriving_mid_stream_is_read_in_slices(
    tiny_gguf_path: Path,
) -> None:
    """Bound: while a ~1,500-token prompt is read, a running stream gets a token after
    every step, and a step reads at most PREFILL_CHUNK_WHILE_DECODING (64) prompt
    tokens; so its gaps stay far below the time the whole prompt takes to read."""
    long_prompt = "a quiet house " * 500
    async with open_supervised_engine(runner(tiny_gguf_path, 2)) as engine:
        bias = await engine.steady_logit_bias()
        t0 = time.perf_counter()
        await generate(engine, "the river " * 750, 1, bias)  # read in one go when alone
        whole_prefill = time.perf_counter() - t0
        stamps: list[float] = []
        long_done: list[float] = []
        arrived = 0.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(generate, engine, "hello world", 1500, bias, stamps)
            while len(stamps) < 50:
                await trio.sleep(0.001)
            arrived = time.perf_counter()
            # A different long prompt: no cached prefix to reuse.
            nursery.start_soon(generate, engine, long_prompt, 1, bias, long_done)
    during = [b - a for a, b in itertools.pairwise(stamps)
              if arrived <= a and b <= long_done[0]]
    prompt_tokens = await _count(tiny_gguf_path, long_prompt)
    assert len(during) >= prompt_tokens // PREFILL_CHUNK_WHILE_DECODING - 2
    worst = sorted(during)[-3:]  # a single descheduling spike on a busy box is not a step
    print(f"{len(during)} tokens while reading {prompt_tokens} prompt tokens; worst gaps "
          f"{[round(g * 1000, 1) for g in worst]} ms; whole prefill {whole_prefill * 1000:.1f} ms")
    assert statistics.median(worst) < whole_prefill / 3


async def _count(model: Path, text: str) -> int:
    async with open_supervised_engine(runner(model, 1)) as engine:
        return await engine.count_tokens(text)


async def test_a_shared_prefix_is_reused_from_another_slots_cache(
    tiny_gguf_path: Path,
) -> None:
    system = "you are a helpful river guide. " * 40
    async with open_supervised_engine(runner(tiny_gguf_path, 2)) as engine:
        bias = await engine.steady_logit_bias()
        params = SamplingParams(temperature=0.0, logit_bias=bias)
        async with engine.stream(system + "first question", params, 400) as first:
            async for _ in first:
                # The first job still holds its slot: the second gets the other one and
                # copies the shared prefix from this one's cells.
                async with engine.stream(system + "second question", params, 4) as second:
                    second_text = "".join([c.text async for c in second])
                break
        assert first.cached_tokens <= 1  # at most the BOS left by the warm-up
        assert second.cached_tokens > second.usage.prompt_tokens * 0.9
    expected, _ = await alone(tiny_gguf_path, 4, prompts=(system + "second question",))
    assert second_text == expected[system + "second question"]
