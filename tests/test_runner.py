"""The supervised engine runner: llama.cpp in a child process the node survives.

Real runner processes over the tiny GGUF. Crashes and hangs are injected with the
runner's test-only --fault hook (abort, segfault, exit, hang after N sampled tokens).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from meshnode.core import runner_wire as wire
from meshnode.engine.base import (
    EngineUnavailable,
    InvalidSamplingParams,
    PromptTooLong,
    SamplingParams,
)
from meshnode.engine.batched import BatchedModel
from meshnode.engine.llama import LlamaEngine, steady_logit_bias
from meshnode.engine.model_file import ModelFileError
from meshnode.engine.runner import PACE_ENV, Runner
from meshnode.engine.supervised import (
    EXIT_GRACE_S,
    PING_INTERVAL_S,
    RunnerConfig,
    RunnerState,
    SupervisedEngine,
    open_supervised_engine,
)

CTX = 512
DATA = Path(__file__).parent / "data"
NATIVE_AMX_BUILD = (DATA / "system-info-native-amx.txt").read_text()
# A restarted runner reloads the tiny model in about a second; allow for a loaded box.
RECOVERY_TIMEOUT_S = 30.0


def config(model: Path, **kwargs: object) -> RunnerConfig:
    base: dict[str, object] = {"backoff_initial_s": 0.05, "backoff_max_s": 0.2}
    base.update(kwargs)
    return RunnerConfig(model=model, n_ctx=CTX, **base)  # type: ignore[arg-type]


async def greedy(engine: SupervisedEngine | LlamaEngine, prompt: str, max_tokens: int,
                 bias: dict[int, float]) -> tuple[str, int]:
    params = SamplingParams(temperature=0.0, logit_bias=bias)
    text = ""
    async with engine.stream(prompt, params, max_tokens) as gen:
        async for chunk in gen:
            text += chunk.text
    return text, gen.usage.completion_tokens


async def wait_state(engine: SupervisedEngine, state: RunnerState) -> None:
    with trio.fail_after(RECOVERY_TIMEOUT_S):
        while engine.state != state:
            await trio.sleep(0.02)


async def test_a_job_in_the_runner_matches_the_in_process_engine(tiny_gguf_path: Path) -> None:
    async with await LlamaEngine.load(tiny_gguf_path, n_ctx=CTX) as local:
        bias = steady_logit_bias(local)
        expected = await greedy(local, "the river", 60, bias)
        local_count = await local.count_tokens("the river flows")
    async with open_supervised_engine(config(tiny_gguf_path)) as engine:
        assert engine.state == RunnerState.READY and engine.pid is not None
        assert await engine.steady_logit_bias() == bias
        assert await greedy(engine, "the river", 60, bias) == expected
        assert await engine.count_tokens("the river flows") == local_count
        assert engine.info.n_ctx == CTX


async def test_a_paced_runner_decodes_no_faster_than_its_pace_and_the_same_text(
    tiny_gguf_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The market scenario's providers differ in speed this way (one CPU, no GPUs).
    async with open_supervised_engine(config(tiny_gguf_path)) as engine:
        bias = await engine.steady_logit_bias()
        expected = await greedy(engine, "the river", 30, bias)
    monkeypatch.setenv(PACE_ENV, "100")
    async with open_supervised_engine(config(tiny_gguf_path)) as engine:
        start = time.monotonic()
        assert await greedy(engine, "the river", 30, bias) == expected
        elapsed = time.monotonic() - start
    assert elapsed >= 29 / 100  # 30 steps, the first one not held back (unpaced: ~10 ms)


@pytest.mark.parametrize(("fault", "signal_name"), [("abort:20", "SIGABRT"),
                                                    ("segv:20", "SIGSEGV")])
async def test_a_runner_that_crashes_mid_generation_fails_the_job_and_comes_back(
    tiny_gguf_path: Path, fault: str, signal_name: str
) -> None:
    states: list[RunnerState] = []
    async with open_supervised_engine(config(tiny_gguf_path, fault=fault)) as engine:
        engine.on_state_change = states.append
        bias = await engine.steady_logit_bias()
        first_pid = engine.pid
        received = 0
        with pytest.raises(EngineUnavailable, match=signal_name):
            async with engine.stream("the river", SamplingParams(temperature=0.0,
                                                                  logit_bias=bias), 200) as gen:
                async for chunk in gen:
                    received += chunk.n_tokens
        assert 0 < received <= 20  # it really died mid-generation
        await wait_state(engine, RunnerState.READY)
        assert engine.pid != first_pid and engine.restarts == 1
        assert states == [RunnerState.RESTARTING, RunnerState.READY]
        text, n = await greedy(engine, "the river", 40, bias)
        assert n == 40 and text


async def test_a_hung_runner_is_detected_within_the_stall_bound(tiny_gguf_path: Path) -> None:
    stall = 2.0
    async with open_supervised_engine(
        config(tiny_gguf_path, fault="hang:10", stall_timeout_s=stall)
    ) as engine:
        bias = await engine.steady_logit_bias()
        last_chunk_at = time.monotonic()
        with pytest.raises(EngineUnavailable, match="hung"):
            async with engine.stream("the river", SamplingParams(temperature=0.0,
                                                                  logit_bias=bias), 200) as gen:
                async for _ in gen:
                    last_chunk_at = time.monotonic()
        detected_after = time.monotonic() - last_chunk_at
        # Silence is checked once per ping interval; the kill and reaping take a moment.
        assert detected_after <= stall + PING_INTERVAL_S + 1.0
        await wait_state(engine, RunnerState.READY)
        assert (await greedy(engine, "the river", 20, bias))[1] == 20


async def test_a_crash_loop_withdraws_the_model_and_the_log_says_why(
    tiny_gguf_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meshnode.engine.supervised")
    cfg = config(tiny_gguf_path, fault="exit:5", fault_every_start=True, crash_loop_count=3)
    async with open_supervised_engine(cfg) as engine:
        bias = await engine.steady_logit_bias()
        for _ in range(3):
            await wait_state(engine, RunnerState.READY)
            with pytest.raises(EngineUnavailable):
                await greedy(engine, "the river", 50, bias)
            if engine.state == RunnerState.WITHDRAWN:
                break
        await wait_state(engine, RunnerState.WITHDRAWN)
        assert not engine.available
        with pytest.raises(EngineUnavailable, match="withdrawn"):
            await greedy(engine, "the river", 5, bias)
    assert any("withdrawn" in r.getMessage() and "3 times" in r.getMessage()
               for r in caplog.records)


async def test_leaving_a_stream_frees_the_runner_for_the_next_job(tiny_gguf_path: Path) -> None:
    async with open_supervised_engine(config(tiny_gguf_path)) as engine:
        bias = await engine.steady_logit_bias()
        params = SamplingParams(temperature=0.0, logit_bias=bias)
        async with engine.stream("the river", params, 400) as gen:
            async for _ in gen:
                break
        assert engine.active_jobs == 0
        with trio.fail_after(5):  # one job at a time: this finishes only if the first stopped
            assert (await greedy(engine, "hello", 10, bias))[1] == 10


async def test_a_node_stopping_mid_job_stops_its_runner_without_waiting_out_timeouts(
    tiny_gguf_path: Path,
) -> None:
    """Ctrl-C on `serve` or `demo` cancels the engine and a job at once: the job must not
    wait CANCEL_CONFIRM_TIMEOUT_S for a confirmation nobody reads any more, nor the runner
    EXIT_GRACE_S for a death that is not coming (it was 10.5 s in `demo`)."""
    streaming = trio.Event()
    with trio.CancelScope() as node:
        async with open_supervised_engine(config(tiny_gguf_path)) as engine:
            bias = await engine.steady_logit_bias()

            async def job() -> None:
                params = SamplingParams(temperature=0.0, logit_bias=bias)
                async with engine.stream("the river", params, 400) as gen:
                    async for _ in gen:
                        streaming.set()
                        await trio.sleep(0.05)  # a slow reader: the job is live

            async with trio.open_nursery() as nursery:
                nursery.start_soon(job)
                await streaming.wait()
                stopped_at = time.monotonic()
                node.cancel()
    took = time.monotonic() - stopped_at
    assert took < EXIT_GRACE_S, f"shutdown took {took:.1f} s"


async def test_bad_requests_come_back_as_typed_errors(tiny_gguf_path: Path) -> None:
    async with open_supervised_engine(config(tiny_gguf_path)) as engine:
        with pytest.raises(InvalidSamplingParams, match="outside the vocabulary"):
            await greedy(engine, "hello", 5, {10**6: -100.0})
        with pytest.raises(PromptTooLong):
            await greedy(engine, "the river " * 400, 5, {})
        assert engine.state == RunnerState.READY  # the runner itself is fine
        assert (await greedy(engine, "hello", 3, {}))[1] >= 1


async def test_a_file_that_is_not_gguf_is_refused_before_a_runner_starts(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"<html>404 not found</html>")
    with pytest.raises(ModelFileError, match="not a GGUF"):
        async with open_supervised_engine(config(bogus)):
            pass


async def test_a_truncated_gguf_is_refused_with_what_to_do(tiny_gguf_path: Path,
                                                           tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf_path.read_bytes()
    cut.write_bytes(data[: len(data) - 4096])
    with pytest.raises(ModelFileError, match="truncated"):
        async with open_supervised_engine(config(cut)):
            pass


def test_a_model_larger_than_free_memory_is_refused(tiny_gguf_path: Path) -> None:
    from meshnode.engine.model_file import check_model_file

    with pytest.raises(ModelFileError, match="does not fit"):
        check_model_file(tiny_gguf_path, memory_available=1024)
    check_model_file(tiny_gguf_path, memory_available=1 << 40)


async def test_on_an_amx_machine_with_an_amx_build_the_runner_loads_safely(
    tiny_gguf_path: Path,
) -> None:
    cfg = config(tiny_gguf_path, cpuinfo=DATA / "cpuinfo-sapphire-rapids.txt",
                 assume_system_info=NATIVE_AMX_BUILD)
    async with open_supervised_engine(cfg) as engine:
        assert "extra buffer types off" in engine.plan
        assert (await greedy(engine, "hello", 8, await engine.steady_logit_bias()))[1] == 8


async def test_on_an_amx_machine_the_safe_build_keeps_repack(tiny_gguf_path: Path) -> None:
    cfg = config(tiny_gguf_path, cpuinfo=DATA / "cpuinfo-sapphire-rapids.txt")
    async with open_supervised_engine(cfg) as engine:
        assert "REPACK kept" in engine.plan  # this build has no AMX kernels


class _WriteRecordingSocket(socket.socket):
    """A real socket that keeps what each write carried."""

    writes: list[bytes]

    def sendall(self, data: Any, flags: int = 0) -> None:
        self.writes.append(bytes(data))
        super().sendall(data, flags)


def test_a_prompts_count_and_its_first_token_reach_the_node_in_one_write(
    tiny_gguf_path: Path,
) -> None:
    """One write, so the node wakes once for both (the runner loop's turn is flushed
    together), and the count still comes before the token."""
    model = BatchedModel(tiny_gguf_path, n_ctx=CTX)
    ours, node = socket.socketpair()
    sock = _WriteRecordingSocket(fileno=ours.detach())
    sock.writes = []
    runner = Runner(sock, model)
    params = SamplingParams(temperature=0.0, logit_bias=model.steady_logit_bias())
    node.sendall(wire.encode({"t": "gen", "id": 7, "prompt": "hello world",
                              "params": params.to_dict(), "max": 3}))
    serving = threading.Thread(target=runner.serve)
    serving.start()
    try:
        node.settimeout(10.0)
        decoder, got = wire.FrameDecoder(), []
        while not any(f["t"] == "end" for f in got):
            got += decoder.feed(node.recv(1 << 16))
    finally:
        node.sendall(wire.encode({"t": "bye"}))
        serving.join(10.0)
        model.close()
    assert [f["t"] for f in got] == ["count", "chunk", "chunk", "chunk", "end"]
    first_write = wire.FrameDecoder().feed(sock.writes[0])
    assert [f["t"] for f in first_write] == ["count", "chunk"]
