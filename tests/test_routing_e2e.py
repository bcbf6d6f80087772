"""Routing over real providers on 127.0.0.1: attestation gate, Busy, mid-stream failover."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import trio

from meshnode.core.job_protocol import STALL_FLOOR_S
from meshnode.core.router import Strategy
from meshnode.engine.base import SamplingParams
from meshnode.engine.llama import LlamaEngine, steady_logit_bias
from meshnode.identity import NodeIdentity
from meshnode.jobs.routed import NoProvider
from meshnode.node import ProviderNode, ProviderSettings, client_node, provider_node

pytestmark = pytest.mark.slow
LONG_CTX = 4096  # as conftest's long_engines: the failover reference runs like them


def steady(engine: LlamaEngine) -> dict[str, Any]:
    return {"temperature": 0.0, "logit_bias": steady_logit_bias(engine)}


async def test_dev_provider_refused_by_default_and_used_with_flag(
    long_engines: list[LlamaEngine],
) -> None:
    async with provider_node(long_engines[0], identity=NodeIdentity.generate()) as prov:
        async with client_node() as strict:
            await strict.connect(prov.addrs[0])
            assert strict.verification(prov.peer_id).startswith("dev")
            with pytest.raises(NoProvider):
                await strict.complete(long_engines[0].info.model_id, "hi", max_tokens=4)
            with pytest.raises(PermissionError):
                await strict.ask(strict.adverts[prov.peer_id], "hi", max_tokens=4)
            assert prov.jobs.stats.jobs_started == 0
        async with client_node(allow_insecure=True) as lax:
            await lax.connect(prov.addrs[0])
            res = await lax.complete(
                long_engines[0].info.model_id, "hi", max_tokens=4, params=steady(long_engines[0])
            )
            assert res.usage.completion_tokens == 4
            assert lax.ran_insecure(res)


async def test_busy_provider_sends_job_elsewhere(long_engines: list[LlamaEngine]) -> None:
    cheap = ProviderSettings(slots=1, max_queue=0, price_completion_per_1k=1)
    dear = ProviderSettings(slots=1, max_queue=0, price_completion_per_1k=1000)
    async with (
        provider_node(long_engines[0], identity=NodeIdentity.generate(), settings=cheap) as a,
        provider_node(long_engines[1], identity=NodeIdentity.generate(), settings=dear) as b,
        client_node(allow_insecure=True, strategy=Strategy.CHEAPEST) as client,
    ):
        for p in (a, b):
            await client.connect(p.addrs[0])
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: client.ask(client.adverts[a.peer_id], "occupy", max_tokens=3000,
                                   params=steady(long_engines[0]))
            )
            with trio.fail_after(10):
                while a.jobs.active == 0:
                    await trio.sleep(0.005)
            res = await client.complete(
                long_engines[0].info.model_id, "hi", max_tokens=8, params=steady(long_engines[0])
            )
            nursery.cancel_scope.cancel()
    assert [s.provider for s in res.segments] == [a.peer_id, b.peer_id]
    assert res.segments[0].error == "busy" and res.segments[0].completion_tokens == 0
    assert res.usage.completion_tokens == 8
    assert a.jobs.stats.busy_refusals == 1


async def test_provider_killed_mid_generation_stream_continues(
    long_engines: list[LlamaEngine], tiny_gguf_path: Path
) -> None:
    max_tokens = 1500
    shown: list[str] = []
    provs: dict[str, ProviderNode] = {}
    scopes: dict[str, trio.CancelScope] = {}
    killed: list[str] = []

    async def run_provider(engine: LlamaEngine, task_status: Any) -> None:
        with trio.CancelScope() as scope:
            async with provider_node(engine, identity=NodeIdentity.generate()) as prov:
                provs[prov.peer_id] = prov
                scopes[prov.peer_id] = scope
                task_status.started()
                await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for engine in long_engines:
            await nursery.start(run_provider, engine)
        async with client_node(allow_insecure=True) as client:
            for prov in provs.values():
                await client.connect(prov.addrs[0])

            async def on_text(text: str) -> None:
                shown.append(text)
                if len(shown) == 40 and not killed:
                    victim = next(p for p, n in provs.items() if n.jobs.active)
                    killed.append(victim)
                    scopes[victim].cancel()  # the provider's host goes down mid-stream

            res = await client.complete(
                long_engines[0].info.model_id, "once upon a time", max_tokens=max_tokens,
                params=steady(long_engines[0]), on_text=on_text,
            )
        nursery.cancel_scope.cancel()

    survivor = next(p for p in provs if p not in killed)
    first, second = res.segments
    assert first.provider == killed[0] and first.error is not None
    assert second.provider == survivor and second.error is None
    assert 0 < first.completion_tokens < max_tokens
    assert first.completion_tokens + second.completion_tokens == max_tokens
    assert res.usage.completion_tokens == max_tokens
    # One continuous answer: what the user saw is exactly the text returned, and the
    # survivor's part is what greedy decoding gives when continuing the partial text.
    # The reference runs on a freshly loaded engine, as the survivor's was when it took
    # over: the same prefill slices from an empty KV cache, so the same floating-point
    # path. (Re-running on a used engine reuses its cached prefix and evaluates the last
    # prompt token alone; a different batch shape shifts the logits by rounding and a
    # near-tie flips somewhere in a thousand greedy tokens.)
    assert "".join(shown) == res.text
    partial = res.text[: first.chars]
    direct: list[str] = []
    params = SamplingParams.from_dict(steady(long_engines[0]))
    async with await LlamaEngine.load(tiny_gguf_path, n_ctx=LONG_CTX) as fresh:
        async with fresh.stream(
            "once upon a time" + partial, params, second.completion_tokens
        ) as gen:
            async for chunk in gen:
                direct.append(chunk.text)
    assert partial + "".join(direct) == res.text


async def test_request_error_is_not_retried_elsewhere(long_engines: list[LlamaEngine]) -> None:
    from meshnode.jobs.client import JobError

    async with (
        provider_node(long_engines[0], identity=NodeIdentity.generate()) as a,
        provider_node(long_engines[1], identity=NodeIdentity.generate()) as b,
        client_node(allow_insecure=True) as client,
    ):
        for p in (a, b):
            await client.connect(p.addrs[0])
        bad = {"logit_bias": {long_engines[0].n_vocab + 5: -100.0}}  # no such token id
        with pytest.raises(JobError) as info:
            await client.complete(long_engines[0].info.model_id, "hi", max_tokens=4, params=bad)
        assert info.value.code == "bad_request"
        assert a.jobs.stats.errors.get("bad_request", 0) + b.jobs.stats.errors.get(
            "bad_request", 0
        ) == 1


async def test_peer_statistics_survive_a_client_restart(
    long_engines: list[LlamaEngine], tmp_path: Path
) -> None:
    stats = tmp_path / "peer-stats.json"
    async with provider_node(long_engines[0], identity=NodeIdentity.generate()) as prov:
        async with client_node(allow_insecure=True, stats_path=stats) as first:
            await first.connect(prov.addrs[0])
            await first.complete(long_engines[0].info.model_id, "hi", max_tokens=4,
                                 params=steady(long_engines[0]))
            learned = first.router.stats(prov.peer_id)
        assert learned.successes == 1 and learned.rtt_s is not None
        async with client_node(allow_insecure=True, stats_path=stats) as second:
            again = second.router.stats(prov.peer_id)
    assert again.successes == 1 and again.rtt_s == learned.rtt_s


async def test_a_new_provider_gets_a_job_within_its_first_two_requests_beside_a_measured_one(
    long_engines: list[LlamaEngine],
) -> None:
    model, params = long_engines[0].info.model_id, steady(long_engines[0])
    async with (
        provider_node(long_engines[0], identity=NodeIdentity.generate()) as old,
        client_node(allow_insecure=True) as client,
    ):
        await client.connect(old.addrs[0])
        for i in range(3):  # the client measures the first provider
            await client.complete(model, f"warm {i}", max_tokens=8, params=params)
        async with provider_node(long_engines[1], identity=NodeIdentity.generate()) as new:
            advert = await client.connect(new.addrs[0])
            assert advert.capacity.tokens_per_s == 0.0  # it never ran a job
            served = [(await client.complete(model, f"job {i}", max_tokens=8,
                                             params=params)).providers[-1] for i in range(2)]
            assert new.peer_id in served
            assert new.jobs.stats.jobs_started >= 1


async def test_policy_may_allow_dev_providers(
    long_engines: list[LlamaEngine], tmp_path: Path
) -> None:
    from meshnode.attest.policy_file import DEFAULT_POLICY_PATH

    policy = tmp_path / "policy.toml"
    policy.write_text(
        DEFAULT_POLICY_PATH.read_text().replace("allow_dev = false", "allow_dev = true")
    )
    async with provider_node(long_engines[0], identity=NodeIdentity.generate()) as prov:
        async with client_node(policy_path=policy) as client:
            await client.connect(prov.addrs[0])
            res = await client.complete(long_engines[0].info.model_id, "hi", max_tokens=3,
                                        params=steady(long_engines[0]))
            assert res.usage.completion_tokens == 3 and client.ran_insecure(res)


async def test_unverified_majority_cannot_choose_the_model_file(
    long_engines: list[LlamaEngine],
) -> None:
    import dataclasses
    import time as _time

    from test_advert import make_advert

    from meshnode.core.advert import encode_signed
    from meshnode.jobs.routed import pick_model_id

    name = long_engines[0].info.name
    async with provider_node(long_engines[0], identity=NodeIdentity.generate()) as prov:
        async with client_node(allow_insecure=True) as client:
            await client.connect(prov.addrs[0])
            now = _time.time()
            for i in range(1, 4):  # unverifiable peers: same name, another file
                seed = bytes([i]) * 32
                fake = make_advert(seed, issued_at=now, expires_at=now + 300)
                offer = dataclasses.replace(fake.models[0], id="ee" * 32, name=name)
                client.directory.insert(
                    encode_signed(dataclasses.replace(fake, models=(offer,)), seed), now
                )
            everyone = client.directory.providers_for(name, now)
            assert pick_model_id(everyone) == "ee" * 32  # counted blindly, fakes would win
            res = await client.complete(name, "hi", max_tokens=3, params=steady(long_engines[0]))
    assert res.providers == [prov.peer_id]


class _HangingEngine:
    """The real llama.cpp engine that stops producing after `after` chunks and never
    ends: a provider that keeps its connection and stream open but sends nothing."""

    def __init__(self, engine: LlamaEngine, after: int) -> None:
        self._engine = engine
        self._after = after
        self.info = engine.info
        self.available = True

    @asynccontextmanager
    async def stream(self, prompt: str, params: Any, max_tokens: int) -> AsyncIterator[Any]:
        async with self._engine.stream(prompt, params, max_tokens) as gen:
            yield _Hanging(gen, self._after)

    async def count_tokens(self, text: str) -> int:
        return await self._engine.count_tokens(text)

    async def aclose(self) -> None:
        return None


class _Hanging:
    def __init__(self, inner: Any, after: int) -> None:
        self._inner = inner
        self._left = after

    def __aiter__(self) -> _Hanging:
        return self

    async def __anext__(self) -> Any:
        if self._left <= 0:
            await trio.sleep_forever()
        self._left -= 1
        return await self._inner.__anext__()

    def ready(self) -> list[Any]:
        return []

    @property
    def finish_reason(self) -> Any:
        return self._inner.finish_reason

    @property
    def usage(self) -> Any:
        return self._inner.usage


async def test_a_provider_that_stops_sending_is_failed_over_within_the_stall_bound(
    long_engines: list[LlamaEngine],
) -> None:
    cheap = ProviderSettings(price_completion_per_1k=1)
    dear = ProviderSettings(price_completion_per_1k=1000)
    hanging = _HangingEngine(long_engines[0], after=20)
    arrivals: list[float] = []
    shown: list[str] = []

    async def on_text(text: str) -> None:
        arrivals.append(trio.current_time())
        shown.append(text)

    async with (
        provider_node(hanging, identity=NodeIdentity.generate(), settings=cheap) as a,  # type: ignore[arg-type]
        provider_node(long_engines[1], identity=NodeIdentity.generate(), settings=dear) as b,
        client_node(allow_insecure=True, strategy=Strategy.CHEAPEST) as client,
    ):
        for p in (a, b):
            await client.connect(p.addrs[0])
        # Well under the old flat TOKEN_TIMEOUT_S: the old client fails here.
        with trio.fail_after(STALL_FLOOR_S + 20):
            res = await client.complete(long_engines[0].info.model_id, "once upon a time",
                                        max_tokens=60, params=steady(long_engines[0]),
                                        on_text=on_text)
    first, second = res.segments
    assert (first.provider, first.error) == (a.peer_id, "stalled")
    assert (second.provider, second.error) == (b.peer_id, None)
    assert res.usage.completion_tokens == 60 and "".join(shown) == res.text
    # The stall is noticed after STALL_FLOOR_S of silence (20 fast tokens set a pace far
    # under a second), and the second provider's first token follows within seconds.
    gaps = [later - earlier for earlier, later in pairwise(arrivals)]
    assert STALL_FLOOR_S <= max(gaps) <= STALL_FLOOR_S + 10, max(gaps)
