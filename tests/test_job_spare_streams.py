"""Time to first token through the mesh: a client keeps a spare job stream to a provider
it just used, so its next job there starts without opening a stream (a spare the provider
gave up on is replaced unseen), and a free provider accepts a short prompt without first
asking its engine runner for the count."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.abc import INetStream
from memory_net_stream import MemoryNetStream
from nacl.public import PrivateKey

from meshnode.core.job_protocol import (
    Accepted,
    ClientJob,
    FreeWindow,
    LocalProtocolError,
    ProviderJob,
)
from meshnode.core.spare_streams import SparePolicy
from meshnode.engine.base import ModelInfo, SamplingParams, TokenChunk, Usage
from meshnode.engine.llama import LlamaEngine, steady_logit_bias
from meshnode.engine.supervised import RunnerConfig, open_supervised_engine
from meshnode.identity import NodeIdentity
from meshnode.jobs.client import JobError
from meshnode.jobs.provider import COUNT_AT_START_MAX_CHARS, JobProvider
from meshnode.node import ClientNode, ProviderNode, client_node, provider_node
from meshnode.p2p.framed import FramedStream

# A provider's wait for Open in the tests that let a spare go stale.
SHORT_OPEN_TIMEOUT_S = 0.3


def steady(engine: LlamaEngine) -> dict[str, Any]:
    return {"temperature": 0.0, "seed": 7, "logit_bias": steady_logit_bias(engine)}


# ---- the bookkeeping (sans-io) --------------------------------------------------------


def test_a_spare_is_handed_out_once_and_only_while_young() -> None:
    policy: SparePolicy[str] = SparePolicy(max_age_s=5.0, keep_s=60.0, max_peers=2)
    assert policy.take("A", 0.0) == (None, [])
    assert policy.job_ended("A", 0.0) == []
    assert policy.wanted(0.0) == ["A"]
    assert policy.wanted(0.1) == []  # being opened: not asked for twice
    assert policy.opened("A", "s1", 1.0) == []
    assert policy.take("A", 5.9) == ("s1", [])
    assert policy.take("A", 5.9) == (None, [])  # taken: gone from the pool
    policy.job_ended("A", 6.0)
    policy.wanted(6.0)
    policy.opened("A", "s2", 6.0)
    assert policy.take("A", 11.0) == (None, ["s2"])  # too old: to close, not to use


def test_old_spares_are_replaced_until_the_provider_is_no_longer_recent() -> None:
    policy: SparePolicy[str] = SparePolicy(max_age_s=5.0, keep_s=12.0, max_peers=2)
    policy.job_ended("A", 0.0)
    policy.wanted(0.0)
    policy.opened("A", "s1", 0.0)
    assert policy.next_deadline() == 5.0
    assert policy.expired(5.0) == ["s1"]
    assert policy.wanted(5.0) == ["A"]  # refreshed
    policy.opened("A", "s2", 5.0)
    assert policy.expired(10.0) == ["s2"]
    assert policy.wanted(10.0) == ["A"]
    policy.opened("A", "s3", 10.0)
    assert policy.expired(12.0) == ["s3"]  # A's last job was 12 s ago: no more spares
    assert policy.wanted(12.0) == [] and policy.next_deadline() is None


def test_spares_are_kept_for_a_bounded_number_of_providers() -> None:
    policy: SparePolicy[str] = SparePolicy(max_age_s=5.0, keep_s=60.0, max_peers=2)
    for i, peer in enumerate("ABC"):
        policy.job_ended(peer, float(i))
        for wanted in policy.wanted(float(i)):
            assert policy.opened(wanted, f"s{wanted}", float(i)) == []
    assert policy.held == 2
    assert policy.take("A", 3.0) == (None, [])  # A was pushed out (and its spare closed)
    assert policy.opened("A", "late", 3.0) == ["late"]  # a spare nobody wants any more
    policy.failed("B")
    assert policy.wanted(3.0) == []  # no retry loop against a peer that failed
    assert sorted(policy.drain()) == ["sB", "sC"] and policy.held == 0


# ---- on real hosts --------------------------------------------------------------------


async def _spare_held(client: ClientNode) -> None:
    with trio.fail_after(10):
        while not client.job_streams.policy.held:
            await trio.sleep(0.01)


async def _two_jobs(prov: ProviderNode, client: ClientNode, engine: LlamaEngine,
                    between: float = 0.0) -> None:
    advert = await client.connect(prov.addrs[0])
    for _ in range(2):
        res = await client.ask(advert, "hello world", max_tokens=6, params=steady(engine))
        assert res.usage.completion_tokens == 6
        await _spare_held(client)
        await trio.sleep(between)


@pytest.mark.slow
async def test_a_second_job_to_the_same_provider_uses_the_spare_stream(
    long_engine: LlamaEngine,
) -> None:
    async with provider_node(long_engine, identity=NodeIdentity.generate()) as prov:
        async with client_node(allow_insecure=True) as client:
            await _two_jobs(prov, client, long_engine)
            streams = client.job_streams
            assert (streams.opened, streams.spares_used) == (1, 1)
            # A spare waiting for its Open is no job: the provider is quiet, and nothing
            # was counted as cancelled or failed.
            with trio.fail_after(2):
                await prov.jobs.wait_quiet()
    assert prov.jobs.stats.jobs_completed == 2
    assert prov.jobs.stats.jobs_cancelled == 0 and not prov.jobs.stats.errors


@pytest.mark.slow
async def test_a_spare_the_provider_gave_up_on_is_replaced_without_failing_the_job(
    long_engine: LlamaEngine,
) -> None:
    async with provider_node(long_engine, identity=NodeIdentity.generate()) as prov:
        prov.jobs.open_timeout_s = SHORT_OPEN_TIMEOUT_S
        async with client_node(allow_insecure=True) as client:
            client.job_streams.policy.max_age_s = 60.0  # the client still thinks it young
            await _two_jobs(prov, client, long_engine, between=3 * SHORT_OPEN_TIMEOUT_S)
            streams = client.job_streams
            # The stale spare was seen closed before use: a fresh stream carried the job.
            assert (streams.opened, streams.spares_used) == (2, 0)
    assert prov.jobs.stats.jobs_completed == 2


@pytest.mark.slow
async def test_a_dead_spare_used_anyway_is_replaced_and_the_job_sent_again(
    long_engine: LlamaEngine,
) -> None:
    async with provider_node(long_engine, identity=NodeIdentity.generate()) as prov:
        prov.jobs.open_timeout_s = SHORT_OPEN_TIMEOUT_S
        async with client_node(allow_insecure=True) as client:
            streams = client.job_streams
            streams.policy.max_age_s = 60.0

            def looks_fine(_stream: INetStream) -> bool:  # as if the close were in flight
                return True

            streams.is_fresh = looks_fine
            await _two_jobs(prov, client, long_engine, between=3 * SHORT_OPEN_TIMEOUT_S)
            # The spare answered with the provider's Open timeout: the same job went
            # again on a fresh stream, and completed.
            assert (streams.opened, streams.spares_used) == (2, 1)
    assert prov.jobs.stats.jobs_completed == 2


# ---- a free job's Accept does not wait for the prompt's count ------------------------


class _CountSpy:
    """Counts the provider's calls of the engine's count_tokens (the real one answers)."""

    def __init__(self, engine: Any) -> None:
        self.calls = 0
        self._real = engine.count_tokens
        engine.count_tokens = self

    async def __call__(self, text: str) -> int:
        self.calls += 1
        return int(await self._real(text))


@pytest.mark.slow
async def test_a_free_job_is_accepted_uncounted_and_done_still_reports_its_prompt_tokens(
    tiny_gguf_path: Path,
) -> None:
    async with (
        open_supervised_engine(RunnerConfig(model=tiny_gguf_path, n_ctx=2048)) as engine,
        provider_node(engine, identity=NodeIdentity.generate()) as prov,
    ):
        expected = await engine.count_tokens("hello world")
        spy = _CountSpy(engine)
        params = {"temperature": 0.0, "logit_bias": await engine.steady_logit_bias()}
        async with client_node(allow_insecure=True) as client:
            advert = await client.connect(prov.addrs[0])
            live_counts: list[list[int]] = []

            async def on_text(_text: str) -> None:
                if not live_counts:
                    live_counts.append([job.prompt_tokens for job in prov.jobs.live])

            # Long enough that the job is still generating when its first token arrives.
            res = await client.ask(advert, "hello world", max_tokens=1500, params=params,
                                   on_text=on_text)
            assert spy.calls == 0  # no round trip to the runner before Accept
            # The runner counted it as the job started: the status page had it from the
            # first token on, and Done reported it.
            assert live_counts == [[expected]]
            assert res.usage.prompt_tokens == expected
            assert prov.jobs.stats.tokens_in == expected
            # A prompt past the size a decode loop tokenizes in passing is counted first
            # (on the runner's tokenizer thread), and refused there if it cannot fit.
            with pytest.raises(JobError) as info:
                await client.ask(advert, "x " * COUNT_AT_START_MAX_CHARS, max_tokens=4,
                                 params=params)
            assert info.value.code == "prompt_too_long" and spy.calls == 1


# ---- Accept is written while the engine starts on the prompt --------------------------


class _SlowToStartEngine:
    """The Engine interface: starting a job takes ENGINE_START_S, then one token."""

    def __init__(self) -> None:
        self.info = ModelInfo(model_id=MODEL, name="slow-start", quant="F32", n_ctx=512,
                              path=Path("/dev/null"))
        self.available = True
        self.asked_at: float | None = None

    @asynccontextmanager
    async def stream(self, prompt: str, params: SamplingParams,
                     max_tokens: int) -> AsyncIterator[Any]:
        self.asked_at = trio.current_time()
        await trio.sleep(ENGINE_START_S)
        yield _OneToken()

    async def count_tokens(self, text: str) -> int:
        return len(text)

    async def aclose(self) -> None:
        return None


class _OneToken:
    def __init__(self) -> None:
        self._left = 1

    def __aiter__(self) -> _OneToken:
        return self

    async def __anext__(self) -> TokenChunk:
        if not self._left:
            raise StopAsyncIteration
        self._left -= 1
        return TokenChunk("a", 1)

    def ready(self) -> list[TokenChunk]:
        return []

    @property
    def finish_reason(self) -> str:
        return "stop"

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=0, completion_tokens=1 - self._left)


MODEL = "ab" * 32
ENGINE_START_S = 1.0


async def test_a_free_job_with_a_free_slot_has_its_engine_started_before_accept_goes_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = _SlowToStartEngine()
    key = PrivateKey.generate()
    provider = JobProvider(engine, bytes(key), peer_id="provider")  # type: ignore[arg-type]
    left, right = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider.handle_stream, MemoryNetStream(right))
        client = FramedStream(MemoryNetStream(left))  # type: ignore[arg-type]
        job = ClientJob(bytes(key.public_key), MODEL, "hello", 4, {"temperature": 0.0})
        start = trio.current_time()
        await client.send_many(job.open(None, None, None))
        assert isinstance(job.receive_frame(await client.recv(10)), Accepted)
        # Accept went out once the engine had been asked to start (the write overlapped
        # the engine's start instead of delaying it).
        assert engine.asked_at is not None and engine.asked_at - start < ENGINE_START_S
        assert trio.current_time() - start >= ENGINE_START_S
        nursery.cancel_scope.cancel()


def test_only_a_free_jobs_prompt_count_can_be_learnt_after_accept() -> None:
    key = PrivateKey.generate()
    for owed_before in (None, 5):
        client = ClientJob(bytes(key.public_key), MODEL, "hello", 4, {})
        job = ProviderJob(key, MODEL)
        for frame in client.open(None, None, None):
            job.receive_frame(frame)
        job.accept(FreeWindow(), 0 if owed_before is None else 3, owed_before)
        if owed_before is None:
            job.prompt_counted(2)
            assert job.prompt_tokens == 2
        else:  # a bill's basis, stated in Accept, cannot change afterwards
            with pytest.raises(LocalProtocolError):
                job.prompt_counted(2)
            assert job.prompt_tokens == 3
