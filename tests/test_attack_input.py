"""A stranger's input costs the provider bounded work before admission (issue 13).

Each attack runs against a real provider (libp2p on 127.0.0.1, llama.cpp on the tiny
model) with meshnode's own terminal log handler attached, and a legitimate job must
complete within a bound while it happens.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import zstandard
from libp2p.custom_types import TProtocol
from rich.console import Console

from meshnode.cli.common import terminal_log_handler
from meshnode.core.crypto import (
    MAX_PLAINTEXT_BYTES,
    MalformedBody,
    Sealer,
    client_session,
    unpack_body,
)
from meshnode.core.messages import JOB_PROTOCOL, Open, Sealed, check_prompt_body, parse_message
from meshnode.core.wire import FrameDecoder, encode_frame
from meshnode.engine.base import PromptTooLong, SamplingParams, max_prompt_bytes
from meshnode.engine.llama import LlamaEngine, steady_logit_bias
from meshnode.engine.tinymodel import tiny_model_path
from meshnode.identity import NodeIdentity
from meshnode.jobs.client import JobError, JobRequest, run_job
from meshnode.node import ClientNode, ProviderNode, client_node, provider_node

# The attack and a 5-token legitimate job take ~0.1 s here; before the fixes, the 32 KiB
# parameter name alone held the event loop for ~17 s on a loaded 2-core box.
LEGIT_JOB_BOUND_S = 3.0
# Half the 64 KiB of the original report: it shows the freeze (quadratic) without making
# the failing run of this test wait minutes.
HUGE_NAME_BYTES = 32 * 1024
REPLY_TIMEOUT_S = 30.0
# The prompt of the report: 60,000 "<s>" (180 KB), each parsed as a special token.
SPECIAL_TOKEN_FLOOD = "<s>" * 60_000
# Bombs in flight at once against one provider (the report had 32; half keeps CI short).
BOMBS_IN_FLIGHT = 16


@pytest.fixture
async def engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LlamaEngine]:
    eng = await LlamaEngine.load(
        tiny_model_path(tmp_path_factory.getbasetemp() / "models"), n_ctx=512
    )
    yield eng
    await eng.aclose()


@pytest.fixture
async def mesh(engine: LlamaEngine) -> AsyncIterator[tuple[ProviderNode, ClientNode]]:
    async with provider_node(engine, identity=NodeIdentity.generate()) as prov:
        async with client_node(allow_insecure=True) as client:
            await client.connect(prov.addrs[0])
            yield prov, client


@pytest.fixture
def terminal_log() -> Iterator[io.StringIO]:
    """meshnode's terminal log handler (as `meshnode serve` in a terminal has it) on the
    `meshnode` logger, writing into a buffer."""
    out = io.StringIO()
    handler = terminal_log_handler(Console(file=out, force_terminal=True, width=1000))
    logger = logging.getLogger("meshnode")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield out
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


async def _raw_exchange(client: ClientNode, prov: ProviderNode, data: bytes) -> dict[str, Any]:
    """Write raw bytes on a fresh job stream, half-close, return the provider's reply."""
    stream = await client.host.new_stream(prov.host.get_id(), [TProtocol(JOB_PROTOCOL)])
    await stream.write(data)
    await stream.close()
    dec = FrameDecoder(max_frame=1 << 20)
    frames: list[dict[str, Any]] = []
    with trio.fail_after(REPLY_TIMEOUT_S):
        while not frames:
            chunk = await stream.read(4096)
            if not chunk:
                break
            frames += dec.feed(chunk)
    assert frames, "provider closed without saying why"
    return frames[0]


def _open_with_params(engine: LlamaEngine, params: dict[str, Any]) -> bytes:
    return encode_frame(
        Open(
            job_id=os.urandom(16),
            model_id=engine.info.model_id,
            params=params,
            max_tokens=4,
            channel_id=None,
            client_pub=os.urandom(32),
            header=os.urandom(24),
        ).to_wire()
    )


async def _legit_job(engine: LlamaEngine, prov: ProviderNode, client: ClientNode) -> int:
    advert = client.adverts[prov.peer_id]
    params = {"temperature": 0.0, "logit_bias": steady_logit_bias(engine)}
    res = await client.ask(advert, "still there?", max_tokens=5, params=params)
    return res.usage.completion_tokens


@pytest.mark.slow
async def test_a_huge_parameter_name_or_type_tag_is_refused_at_once_and_a_legit_job_completes(
    engine: LlamaEngine, mesh: tuple[ProviderNode, ClientNode], terminal_log: io.StringIO
) -> None:
    prov, client = mesh
    attacks = {
        "bad_params": _open_with_params(engine, {"k" * HUGE_NAME_BYTES: 1.0}),
        # A frame of almost 1 MiB whose type tag is a list of a million items.
        "unknown_message": encode_frame({"t": [0] * 1_000_000}),
    }
    replies: dict[str, dict[str, Any]] = {}

    async def attack(code: str, frame: bytes) -> None:
        replies[code] = await _raw_exchange(client, prov, frame)

    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for code, frame in attacks.items():
            nursery.start_soon(attack, code, frame)
        await trio.sleep(0)
        assert await _legit_job(engine, prov, client) == 5
        legit_s = time.monotonic() - start
    assert legit_s < LEGIT_JOB_BOUND_S, f"a legit job took {legit_s:.1f} s during the attack"
    for code, reply in replies.items():
        assert reply["t"] == "error" and reply["code"] in (code, "malformed_frame"), reply
        assert len(reply["msg"]) < 300, f"{code}: error carries {len(reply['msg'])} chars"
    logged = terminal_log.getvalue()
    assert "unknown sampling parameter" in logged
    lines = logged.splitlines()  # one 1000-column line per record, none wrapped
    assert len(lines) < 10, f"{len(lines)} lines logged for two refused frames and a job"


@pytest.mark.slow
async def test_a_special_token_flood_is_refused_unparsed_and_a_legit_job_completes(
    engine: LlamaEngine, mesh: tuple[ProviderNode, ClientNode]
) -> None:
    prov, client = mesh
    advert = client.adverts[prov.peer_id]
    codes: list[str] = []

    async def attack() -> None:
        request = JobRequest(model_id=engine.info.model_id, prompt=SPECIAL_TOKEN_FLOOD,
                             max_tokens=4, params={})
        with pytest.raises(JobError) as info:
            await run_job(client.host, prov.host.get_id(), advert.job_pubkey, request)
        codes.append(info.value.code)

    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(attack)
        nursery.start_soon(attack)
        await trio.sleep(0)
        assert await _legit_job(engine, prov, client) == 5
        legit_s = time.monotonic() - start
    assert legit_s < LEGIT_JOB_BOUND_S, f"a legit job took {legit_s:.1f} s during the attack"
    assert codes == ["prompt_too_long", "prompt_too_long"]


def _bomb_body() -> bytes:
    """A packed sealed-body (flag + zstd) of ~67 bytes holding 1 MiB of empty lists."""
    raw = msgpack.packb({"k": "prompt", "prompt": [[] for _ in range(MAX_PLAINTEXT_BYTES - 64)]})
    return b"\x01" + zstandard.ZstdCompressor(level=19).compress(raw)


def test_a_zstd_msgpack_bomb_is_refused_before_msgpack_builds_it() -> None:
    bomb = _bomb_body()
    assert len(bomb) < 100
    runs = 20
    start = time.perf_counter()
    for _ in range(runs):
        with pytest.raises(MalformedBody):
            unpack_body(bomb)
    per_decode = (time.perf_counter() - start) / runs
    # ~0.1 ms here after the fix; building the million lists took 0.1-1.4 s before.
    assert per_decode < 0.01, f"{per_decode * 1000:.1f} ms per bomb"


def test_errors_built_from_peer_input_are_short_whatever_the_input() -> None:
    from meshnode.pay.channel.protocol import parse_request

    huge = "k" * (1 << 20)
    mixed_keys: dict[Any, Any] = {huge: 1, 7: 2}  # unsortable, and one key a megabyte
    cases: list[Callable[[], object]] = [
        lambda: parse_message({"t": [0] * 1_000_000}),
        lambda: parse_message({"t": huge}),
        lambda: parse_message({"t": "sealed", "c": b"", **mixed_keys}),
        lambda: SamplingParams.from_dict({huge: 1, "x" * 10: 2}),
        lambda: SamplingParams.from_dict({"stop": [huge]}),
        lambda: SamplingParams.from_dict({"logit_bias": {huge: 1.0}}),
        lambda: check_prompt_body({"k": "prompt", "prompt": [huge]}),
        lambda: parse_request({"t": [huge] * 1000}),
        lambda: parse_request({"t": "close", **mixed_keys}),
    ]
    for make in cases:
        with pytest.raises(Exception) as info:
            make()
        assert len(str(info.value)) < 300, str(info.value)[:200]
        assert str(info.value).isprintable()


@pytest.mark.slow
async def test_bombs_in_flight_get_a_typed_refusal_and_a_legit_job_completes(
    engine: LlamaEngine, mesh: tuple[ProviderNode, ClientNode]
) -> None:
    from nacl.bindings import crypto_secretstream_xchacha20poly1305_push as push
    from nacl.bindings import crypto_secretstream_xchacha20poly1305_TAG_MESSAGE as tag
    from nacl.public import PrivateKey

    prov, client = mesh
    advert = client.adverts[prov.peer_id]
    bomb = _bomb_body()
    frames = []
    for _ in range(BOMBS_IN_FLIGHT):  # each its own session: sealed before the clock starts
        key, job_id = PrivateKey.generate(), os.urandom(16)
        sealer = Sealer(client_session(key, advert.job_pubkey).send, ad=job_id)
        opened = Open(job_id=job_id, model_id=engine.info.model_id, params={}, max_tokens=4,
                      channel_id=None, client_pub=bytes(key.public_key), header=sealer.header)
        sealed = push(sealer._state, bomb, job_id, tag)  # the packed bomb, sealed as is
        frames.append(encode_frame(opened.to_wire()) + encode_frame(Sealed(sealed).to_wire()))
    codes: list[str] = []

    async def attack(frame: bytes) -> None:
        codes.append((await _raw_exchange(client, prov, frame))["code"])

    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        for frame in frames:
            nursery.start_soon(attack, frame)
        await trio.sleep(0)
        assert await _legit_job(engine, prov, client) == 5
        legit_s = time.monotonic() - start
    assert legit_s < LEGIT_JOB_BOUND_S, f"a legit job took {legit_s:.1f} s during the attack"
    assert codes == ["malformed_body"] * BOMBS_IN_FLIGHT


# A context where the byte cap (8 per token) still admits 21,845 "<s>": 2-10 s of
# llama.cpp's special-token parsing on this box without the special-token budget.
RUNNER_CTX = 8192
# Refusing the flood is one regex pass (~1 ms); parsing it took seconds.
FLOOD_REFUSAL_BOUND_S = 1.0


@pytest.mark.slow
async def test_the_runner_refuses_a_special_token_flood_at_once_and_reuses_a_count_for_its_job(
    tiny_gguf_path: Path,
) -> None:
    from meshnode.engine.supervised import RunnerConfig, open_supervised_engine

    flood = "<s>" * (max_prompt_bytes(RUNNER_CTX) // 3)
    config = RunnerConfig(model=tiny_gguf_path, n_ctx=RUNNER_CTX)
    async with open_supervised_engine(config) as engine:
        start = time.monotonic()
        with pytest.raises(PromptTooLong, match="special tokens"):
            await engine.count_tokens(flood)
        took = time.monotonic() - start
        assert took < FLOOD_REFUSAL_BOUND_S, f"refusing the flood took {took:.1f} s"
        # A prompt within the budget is counted once: its job uses the same tokens.
        prompt = "<s>the river flows " * 500
        counted = await engine.count_tokens(prompt)
        params = SamplingParams(temperature=0.0, logit_bias=await engine.steady_logit_bias())
        async with engine.stream(prompt, params, 4) as gen:
            async for _chunk in gen:
                pass
        assert gen.usage.prompt_tokens == counted > 1000


async def test_the_special_token_budget_counts_the_vocabularys_special_texts(
    tiny_gguf_path: Path,
) -> None:
    from meshnode.engine.special_tokens import (
        MAX_SPECIAL_TOKENS_PER_PROMPT,
        SpecialTokenBudget,
        TooManySpecialTokens,
    )

    budget = SpecialTokenBudget(["<s>", "</s>", "<unk>", "<start_of_turn>", "<start>",
                                 "\n", "  ", "\t\t"], limit=5)
    assert budget.count("a <s> b </s><start_of_turn>x<start><star<unk") == 4
    # Whitespace runs (special in Gemma's vocabulary) are cheap to parse and fill every
    # code or prose prompt: a 1,000-line file is not refused for its newlines.
    budget.check("def f():\n\t\treturn  1\n" * 1000)
    assert budget.count("<" * 10_000 + "s>") == 1
    with pytest.raises(TooManySpecialTokens):
        budget.check("<s>" * 6)
    within = "<s>hello</s>" * (MAX_SPECIAL_TOKENS_PER_PROMPT // 2)
    async with await LlamaEngine.load(tiny_gguf_path, n_ctx=RUNNER_CTX) as engine:
        assert await engine.count_tokens(within) > MAX_SPECIAL_TOKENS_PER_PROMPT
        with pytest.raises(TooManySpecialTokens):
            await engine.count_tokens(within + "<unk>")


def test_the_shape_check_passes_every_body_we_send_and_fails_junk_only_with_its_own_error(
) -> None:
    import random

    from meshnode.core.crypto import MAX_BODY_DEPTH, MAX_BODY_OBJECTS
    from meshnode.core.messages import Usage
    from meshnode.core.wire import MalformedFrame, check_shape

    bodies: list[dict[str, Any]] = [
        {"k": "prompt", "prompt": "é" * 70_000},
        {"k": "tokens", "text": "x" * 300, "n": 3, "total": 2**40},
        Usage(prompt_tokens=2**63, completion_tokens=5, finish_reason="stop",
              cost_nanoton=2**64 - 1).to_body(),
        {"f": 1.5, "b": b"\x00" * 70_000, "n": None, "t": True, "neg": -(2**63), "l": [1, 2]},
        {"s8": "y" * 100, "b8": b"\x01" * 100, "s16": "z" * 300, "b16": b"\x02" * 300,
         "i": [-1, 200, -200, 70_000, -70_000, 2**33, -(2**33), 0.25]},
    ]
    for body in bodies:
        check_shape(msgpack.packb(body), max_depth=MAX_BODY_DEPTH, max_objects=MAX_BODY_OBJECTS)
        assert unpack_body(b"\x00" + msgpack.packb(body)) == body
    rng = random.Random(0)
    for _ in range(5000):
        junk = rng.randbytes(rng.randrange(64))
        try:
            check_shape(junk, max_depth=MAX_BODY_DEPTH, max_objects=MAX_BODY_OBJECTS)
        except MalformedFrame:
            pass


def test_a_megabyte_frame_of_tiny_values_is_refused_before_it_is_built() -> None:
    from meshnode.core.wire import MalformedFrame, decode_body

    largest_open = Open(job_id=os.urandom(16), model_id="ab" * 32, max_tokens=4,
                        params={"logit_bias": {i: -100.0 for i in range(300)},
                                "stop": ["a", "b", "c", "d"]},
                        channel_id=None, client_pub=os.urandom(32), header=os.urandom(24))
    snapshot = {"t": "adverts", "items": [os.urandom(40) for _ in range(1024)]}
    for legit in (largest_open.to_wire(), snapshot):
        assert decode_body(msgpack.packb(legit, use_bin_type=True)) == legit
    for hostile in ({"t": [0] * 1_000_000}, {"t": "open", "x": [[]] * 1_000_000}):
        body = msgpack.packb(hostile)
        start = time.perf_counter()
        with pytest.raises(MalformedFrame):
            decode_body(body)
        took = time.perf_counter() - start
        assert took < 0.05, f"{took * 1000:.0f} ms for one frame"  # 2 ms; 0.3-1 s before
