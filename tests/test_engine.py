"""The engine contract: validated sampling, exact token counts, clean cancellation."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import trio

from meshnode.engine.base import (
    MAX_LOGIT_BIAS_ENTRIES,
    EngineError,
    InvalidRequest,
    InvalidSamplingParams,
    PromptTooLong,
    SamplingParams,
    TokenChunk,
)
from meshnode.engine.llama import LlamaEngine, _bias_array, steady_logit_bias
from meshnode.engine.textstream import TextAssembler
from meshnode.engine.tinymodel import EOS_ID, SPM_SPACE, tiny_vocab

PROMPT = "the river and the stone"
# Longer than any test reads, shorter than the tiny context minus the prompt.
LONG_RUN_TOKENS = 400
# The exit of a stream waits for the decode thread; a token of the tiny model takes well
# under a millisecond, so anything near this bound means the thread did not stop.
STOP_BOUND_S = 2.0


def steady(engine: LlamaEngine, **overrides: Any) -> SamplingParams:
    """Params under which every sampled token prints and nothing ends the run early."""
    return SamplingParams(**{"logit_bias": steady_logit_bias(engine), **overrides})


async def collect(
    engine: LlamaEngine, prompt: str, params: SamplingParams, max_tokens: int
) -> tuple[list[TokenChunk], Any]:
    async with engine.stream(prompt, params, max_tokens) as generation:
        chunks = [chunk async for chunk in generation]
    return chunks, generation


def text_of(chunks: list[TokenChunk]) -> str:
    return "".join(c.text for c in chunks)


# ---- SamplingParams ----------------------------------------------------------------


def test_default_sampling_params_round_trip_through_the_wire_form() -> None:
    params = SamplingParams(seed=5, stop=("\n",), logit_bias={3: -1.5})
    assert SamplingParams.from_dict(params.to_dict()) == params


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, "temperature"),
        ("temperature", 2.5, "temperature"),
        ("temperature", float("nan"), "finite"),
        ("temperature", "hot", "number"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -1, "top_k"),
        ("top_k", 1.5, "integer"),
        ("seed", -1, "seed"),
        ("seed", 2**32 - 1, "seed"),
        ("stop", "\n", "list of strings"),
        ("stop", ["a", "b", "c", "d", "e"], "at most"),
        ("stop", [""], "non-empty"),
        ("stop", ["x" * 65], "at most 64"),
        ("logit_bias", {1: 101.0}, "logit_bias"),
        ("logit_bias", {-1: 1.0}, "token ids"),
        ("logit_bias", {"one": 1.0}, "token ids"),
        ("logit_bias", {i: 1.0 for i in range(MAX_LOGIT_BIAS_ENTRIES + 1)}, "at most"),
        ("logit_bias", [1, 2], "mapping"),
        # Floats with int token ids take the in-line check: its edges still refuse.
        ("logit_bias", {1: float("nan")}, "finite"),
        ("logit_bias", {1: float("-inf")}, "finite"),
        ("logit_bias", {2: -100.5}, "logit_bias"),
        ("logit_bias", {True: 1.0}, "token ids"),
        ("repeat_penalty", 0.0, "repeat_penalty"),
        ("repeat_penalty", 3.0, "repeat_penalty"),
    ],
)
def test_out_of_range_sampling_params_are_rejected_with_the_field_named(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(InvalidSamplingParams, match=message):
        SamplingParams.from_dict({field: value})


def test_equal_sampling_params_hash_equally() -> None:
    a = SamplingParams(seed=1, logit_bias={5: 1.0})
    b = SamplingParams.from_dict({"seed": 1, "logit_bias": {"5": 1}})
    assert a == b
    assert hash(a) == hash(b)


def test_booleans_are_not_accepted_as_numbers() -> None:
    with pytest.raises(InvalidSamplingParams, match="number"):
        SamplingParams.from_dict({"temperature": True})


def test_unknown_sampling_keys_are_rejected() -> None:
    with pytest.raises(InvalidSamplingParams, match="unknown sampling parameter"):
        SamplingParams.from_dict({"temprature": 0.5})


def test_a_non_map_is_rejected() -> None:
    with pytest.raises(InvalidSamplingParams, match="must be a map"):
        SamplingParams.from_dict([("temperature", 0.5)])  # type: ignore[arg-type]


def test_json_string_token_ids_in_logit_bias_become_ints() -> None:
    params = SamplingParams.from_dict({"logit_bias": {"42": -3}})
    assert dict(params.logit_bias) == {42: -3.0}


def test_a_bias_handed_to_llama_cpp_holds_every_token_with_its_value() -> None:
    bias = {3: -100.0, 70000: 2.5, 0: 0.0, 2**31 - 1: -0.25}
    entries = _bias_array(bias)
    assert [(e.token, e.bias) for e in entries] == list(bias.items())


def test_invalid_sampling_params_is_a_value_error() -> None:
    assert issubclass(InvalidSamplingParams, ValueError)


def test_a_token_chunk_cannot_be_empty() -> None:
    with pytest.raises(ValueError, match="text"):
        TokenChunk(text="", n_tokens=1)


# ---- TextAssembler -----------------------------------------------------------------


def test_a_character_split_over_byte_tokens_is_released_whole_with_its_token_count() -> None:
    assembler = TextAssembler()
    encoded = "\U0001f642".encode()
    released = [assembler.feed(encoded[i : i + 1]) for i in range(len(encoded))]
    assert released[:-1] == [None] * (len(encoded) - 1)
    assert released[-1] == TokenChunk(text="\U0001f642", n_tokens=len(encoded))


def test_bytes_that_can_never_be_utf8_become_a_replacement_character() -> None:
    assembler = TextAssembler()
    chunk = assembler.feed(b"\xff")
    assert chunk == TokenChunk(text="\ufffd", n_tokens=1)


def test_a_stop_string_spanning_tokens_is_cut_and_the_text_before_it_released() -> None:
    assembler = TextAssembler(stop=("END",))
    assert assembler.feed(b"ok E") == TokenChunk(text="ok ", n_tokens=1)
    assert assembler.feed(b"N") is None
    assert assembler.feed(b"D more") is None
    assert assembler.stopped
    assert assembler.unreleased_tokens == 2


def test_text_that_only_began_like_a_stop_string_is_released_once_it_diverges() -> None:
    assembler = TextAssembler(stop=("END",))
    assert assembler.feed(b"EN") is None
    assert assembler.feed(b"joy") == TokenChunk(text="ENjoy", n_tokens=2)
    assert not assembler.stopped


def test_finish_releases_held_text_and_drops_an_incomplete_character() -> None:
    assembler = TextAssembler(stop=("END",))
    assert assembler.feed(b"E") is None
    assert assembler.finish() == TokenChunk(text="E", n_tokens=1)
    dangling = TextAssembler()
    assert dangling.feed(b"\xf0\x9f") is None
    assert dangling.finish() is None


# ---- LlamaEngine -------------------------------------------------------------------


async def test_model_id_is_the_sha256_of_the_gguf_file(
    tiny_engine: LlamaEngine, tiny_gguf_path: Path
) -> None:
    assert tiny_engine.info.model_id == hashlib.sha256(tiny_gguf_path.read_bytes()).hexdigest()


async def test_model_name_comes_from_the_gguf_metadata(tiny_engine: LlamaEngine) -> None:
    assert tiny_engine.info.name == "tiny-llama-random"


async def test_loading_a_missing_file_says_which_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.gguf"):
        await LlamaEngine.load(tmp_path / "nope.gguf", n_ctx=128)


async def test_loading_a_file_that_is_not_gguf_is_an_engine_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model" * 100)
    with pytest.raises(EngineError, match="could not load"):
        await LlamaEngine.load(junk, n_ctx=128)


async def test_chunk_token_counts_add_up_to_max_tokens(tiny_engine: LlamaEngine) -> None:
    chunks, generation = await collect(tiny_engine, PROMPT, steady(tiny_engine, seed=1), 50)
    assert sum(c.n_tokens for c in chunks) == 50
    assert generation.finish_reason == "length"
    assert generation.usage.completion_tokens == 50


async def test_prompt_tokens_in_usage_match_count_tokens(tiny_engine: LlamaEngine) -> None:
    _, generation = await collect(tiny_engine, PROMPT, steady(tiny_engine, seed=1), 5)
    assert generation.usage.prompt_tokens == await tiny_engine.count_tokens(PROMPT)


async def test_same_seed_gives_the_same_text(tiny_engine: LlamaEngine) -> None:
    params = steady(tiny_engine, temperature=1.0, seed=1234)
    first, _ = await collect(tiny_engine, PROMPT, params, 64)
    second, _ = await collect(tiny_engine, PROMPT, params, 64)
    assert text_of(first) == text_of(second)


async def test_different_seeds_give_different_text(tiny_engine: LlamaEngine) -> None:
    a, _ = await collect(tiny_engine, PROMPT, steady(tiny_engine, temperature=1.0, seed=1), 64)
    b, _ = await collect(tiny_engine, PROMPT, steady(tiny_engine, temperature=1.0, seed=2), 64)
    assert text_of(a) != text_of(b)


async def test_a_reused_prompt_prefix_gives_the_same_text_as_a_fresh_model(
    tiny_gguf_path: Path,
) -> None:
    async with await LlamaEngine.load(tiny_gguf_path, n_ctx=256) as fresh:
        expected, _ = await collect(fresh, PROMPT, steady(fresh, temperature=0.0), 40)
    async with await LlamaEngine.load(tiny_gguf_path, n_ctx=256) as warm:
        await collect(warm, PROMPT + " and more words", steady(warm, temperature=0.0), 10)
        got, _ = await collect(warm, PROMPT, steady(warm, temperature=0.0), 40)
    assert text_of(got) == text_of(expected)


async def test_a_stop_string_ends_generation_before_it(tiny_engine: LlamaEngine) -> None:
    greedy = steady(tiny_engine, temperature=0.0)
    full, _ = await collect(tiny_engine, PROMPT, greedy, 60)
    text = text_of(full)
    stop = text[len(text) // 2 : len(text) // 2 + 4]
    chunks, generation = await collect(
        tiny_engine, PROMPT, steady(tiny_engine, temperature=0.0, stop=(stop,)), 60
    )
    assert text_of(chunks) == text[: text.index(stop)]
    assert generation.finish_reason == "stop"


async def test_logit_bias_forces_a_token(tiny_engine: LlamaEngine) -> None:
    river = [p for p, _, _ in tiny_vocab()].index(SPM_SPACE + "river")
    params = SamplingParams(temperature=0.0, logit_bias={river: 100.0})
    chunks, _ = await collect(tiny_engine, PROMPT, params, 8)
    assert text_of(chunks) == " river" * 8


async def test_an_end_of_generation_token_finishes_with_stop_and_no_text(
    tiny_engine: LlamaEngine,
) -> None:
    params = SamplingParams(temperature=0.0, logit_bias={EOS_ID: 100.0})
    chunks, generation = await collect(tiny_engine, PROMPT, params, 8)
    assert chunks == []
    assert generation.finish_reason == "stop"
    assert generation.usage.completion_tokens == 0


async def test_generation_ends_with_length_when_the_context_is_full(
    tiny_gguf_path: Path,
) -> None:
    async with await LlamaEngine.load(tiny_gguf_path, n_ctx=64) as small:
        n_ctx = small.info.n_ctx  # llama.cpp may round the context up
        _, generation = await collect(small, PROMPT, steady(small, seed=3), n_ctx + 100)
    assert generation.finish_reason == "length"
    assert generation.usage.prompt_tokens + generation.usage.completion_tokens == n_ctx


async def test_leaving_the_stream_early_stops_the_decode_thread(
    tiny_engine: LlamaEngine,
) -> None:
    with trio.fail_after(STOP_BOUND_S):
        async with tiny_engine.stream(PROMPT, steady(tiny_engine), LONG_RUN_TOKENS) as gen:
            async for _ in gen:
                break
    assert not tiny_engine.busy
    decoded = tiny_engine.decoded_tokens_total
    await trio.sleep(0.2)
    assert tiny_engine.decoded_tokens_total == decoded
    assert gen.finish_reason == "cancelled"
    assert gen.usage.completion_tokens < LONG_RUN_TOKENS


async def test_cancelling_the_consumer_stops_the_decode_thread(tiny_engine: LlamaEngine) -> None:
    with trio.move_on_after(STOP_BOUND_S) as outer:
        async with tiny_engine.stream(PROMPT, steady(tiny_engine), LONG_RUN_TOKENS) as gen:
            async for _ in gen:
                outer.cancel()
                await trio.sleep(1)  # the checkpoint where the cancellation lands
    assert outer.cancelled_caught
    assert not tiny_engine.busy
    assert gen.finish_reason == "cancelled"


async def test_leaving_a_stream_still_queued_for_the_model_returns_at_once(
    tiny_engine: LlamaEngine,
) -> None:
    params = steady(tiny_engine)
    async with tiny_engine.stream(PROMPT, params, LONG_RUN_TOKENS) as running:
        await running.__anext__()  # the first stream now holds the model, unread
        with trio.fail_after(STOP_BOUND_S):
            async with tiny_engine.stream(PROMPT, params, 10) as queued:
                await trio.sleep(0.05)
        assert queued.finish_reason == "cancelled"
        assert queued.usage.completion_tokens == 0
        assert tiny_engine.busy


async def test_an_error_in_the_consumer_propagates_unwrapped(tiny_engine: LlamaEngine) -> None:
    class ConsumerFailed(Exception):
        pass

    with pytest.raises(ConsumerFailed):
        async with tiny_engine.stream(PROMPT, steady(tiny_engine), LONG_RUN_TOKENS) as gen:
            async for _ in gen:
                raise ConsumerFailed
    assert not tiny_engine.busy


async def test_concurrent_streams_take_turns_and_each_gets_its_own_text(
    tiny_engine: LlamaEngine,
) -> None:
    prompts = ["the river", "a small stone", "music and fire"]
    params = steady(tiny_engine, temperature=0.0)
    alone = [text_of((await collect(tiny_engine, p, params, 30))[0]) for p in prompts]
    together: dict[str, str] = {}

    async def run(prompt: str) -> None:
        together[prompt] = text_of((await collect(tiny_engine, prompt, params, 30))[0])

    async with trio.open_nursery() as nursery:
        for prompt in prompts:
            nursery.start_soon(run, prompt)
    assert [together[p] for p in prompts] == alone


async def test_a_prompt_that_fills_the_context_is_refused(tiny_gguf_path: Path) -> None:
    async with await LlamaEngine.load(tiny_gguf_path, n_ctx=64) as small:
        too_long = "the " * small.info.n_ctx
        with pytest.raises(PromptTooLong, match="context"):
            async with small.stream(too_long, SamplingParams(), 4):
                pass


async def test_max_tokens_must_be_positive(tiny_engine: LlamaEngine) -> None:
    with pytest.raises(InvalidRequest, match="max_tokens"):
        async with tiny_engine.stream(PROMPT, SamplingParams(), 0):
            pass


async def test_logit_bias_outside_the_vocabulary_is_refused(tiny_engine: LlamaEngine) -> None:
    params = SamplingParams(logit_bias={tiny_engine.n_vocab: 1.0})
    with pytest.raises(InvalidSamplingParams, match="vocabulary"):
        async with tiny_engine.stream(PROMPT, params, 4):
            pass


async def test_steady_bias_bans_every_byte_token_and_end_of_generation(
    tiny_engine: LlamaEngine,
) -> None:
    bias = steady_logit_bias(tiny_engine)
    vocab = tiny_vocab()
    byte_ids = {i for i, (p, _, _) in enumerate(vocab) if p.startswith("<0x")}
    assert byte_ids | {EOS_ID} <= set(bias)
    assert all(value < 0 for value in bias.values())


async def test_a_closed_engine_refuses_new_streams(tiny_gguf_path: Path) -> None:
    engine = await LlamaEngine.load(tiny_gguf_path, n_ctx=64)
    await engine.aclose()
    with pytest.raises(EngineError, match="closed"):
        async with engine.stream(PROMPT, SamplingParams(), 4):
            pass


def test_chat_format_follows_the_gguf_template() -> None:
    from meshnode.engine.base import chat_format_of

    assert chat_format_of(None) == "qa"  # a base model: question/answer framing
    assert chat_format_of("{{ '<start_of_turn>' + role }}") == "gemma"
    assert chat_format_of("{{ '<|im_start|>' }}") == "chatml"
    assert chat_format_of("{{ '<|start_header_id|>' }}") == "llama3"
    assert chat_format_of("{{ something else }}") == ""


async def test_warm_up_decodes_one_token_and_frees_the_engine(tiny_engine: LlamaEngine) -> None:
    before = tiny_engine.decoded_tokens_total
    await tiny_engine.warm_up()
    assert tiny_engine.decoded_tokens_total == before + 1
    assert not tiny_engine.busy
