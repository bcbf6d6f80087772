"""The job protocol's ordering rules, on the sans-io state machines and on memory streams
with a mock clock: no hosts, no sleeps."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.peer.id import ID
from memory_net_stream import MemoryNetStream
from nacl.public import PrivateKey

from meshnode.core.job_protocol import (
    FIRST_TOKEN_FLOOR_S,
    STALL_FLOOR_S,
    STALL_GAP_FACTOR,
    TOKEN_TIMEOUT_S,
    Accepted,
    ClientJob,
    FreeWindow,
    JobDone,
    JobRefused,
    LocalProtocolError,
    PaymentRequested,
    PromptReceived,
    ProtocolError,
    ProviderJob,
    RemoteProtocolError,
    StallDetector,
    TokensReceived,
    VoucherReceived,
)
from meshnode.core.messages import (
    Accept,
    Busy,
    ErrorMsg,
    Message,
    NeedPayment,
    Open,
    Sealed,
    VoucherMsg,
)
from meshnode.engine.base import ModelInfo, SamplingParams, TokenChunk, Usage
from meshnode.jobs.client import JobError, JobRequest, ProviderBusy, run_job_on_stream
from meshnode.jobs.provider import JobProvider
from meshnode.p2p.framed import FramedStream

MODEL = "ab" * 32


class Window:
    """A credit window of `limit` tokens past what vouchers paid for (`paid`)."""

    def __init__(self, limit: int = 5, deposit: int = 1000) -> None:
        self.limit = limit
        self.paid = 0
        self.deposit = deposit

    def may_produce(self, upto: int) -> bool:
        return upto <= self.paid + self.limit

    def exhausted(self, upto: int) -> bool:
        return upto > self.deposit

    def ask(self, delivered: int, upto: int) -> int:
        return max(upto - self.limit, delivered)

    def settled(self, delivered: int) -> bool:
        return self.paid >= delivered


def handshake(window: Any = None, prompt: str = "hi") -> tuple[ClientJob, ProviderJob]:
    """A client and a provider machine talking up to the provider's Accept."""
    key = PrivateKey.generate()
    client = ClientJob(bytes(key.public_key), MODEL, prompt, 100, {})  # a random job id
    provider = ProviderJob(key, MODEL)
    open_msg, sealed = client.open(None, None, None)
    provider.receive_frame(open_msg)
    assert provider.receive_frame(sealed) == PromptReceived(prompt)
    accept = provider.accept(window or FreeWindow(), prompt_tokens=3, owed_before=None)
    assert client.receive_frame(accept) == Accepted(None, None)
    return client, provider


def chunks(*texts: str) -> list[TokenChunk]:
    return [TokenChunk(t, 1) for t in texts]


def test_a_whole_conversation_streams_tokens_and_the_bill() -> None:
    client, provider = handshake()
    frame, taken = provider.tokens(chunks("Hel", "lo"))
    assert taken == 2
    assert client.receive_frame(frame) == TokensReceived("Hello", 2, 2)
    done = client.receive_frame(provider.done("stop", 7))
    assert isinstance(done, JobDone)
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (3, 2)
    assert done.usage.cost_nanoton == 7


def test_a_batch_never_outruns_the_credit_window() -> None:
    _, provider = handshake(Window(limit=5))
    _, taken = provider.tokens([TokenChunk("a", 2), TokenChunk("b", 2), TokenChunk("c", 2)])
    assert taken == 2 and provider.delivered == 4


def test_tokens_past_the_window_and_done_before_settling_are_the_drivers_bug() -> None:
    window = Window(limit=2)
    _, provider = handshake(window)
    provider.tokens(chunks("a", "b"))
    with pytest.raises(LocalProtocolError):
        provider.tokens(chunks("c"))
    with pytest.raises(LocalProtocolError):
        provider.done("stop", 0)


def test_a_prompt_costing_more_than_the_window_is_asked_for_before_any_token() -> None:
    window = Window(limit=0)  # the prompt alone fills the window
    client, provider = handshake(window)
    ask = provider.payment_due(1)
    assert isinstance(ask, NeedPayment) and ask.delivered == 0
    assert client.receive_frame(ask) == PaymentRequested(ask.owed, 0)
    voucher = client.voucher(b"boc")
    assert provider.receive_frame(voucher) == VoucherReceived(b"boc")
    window.paid = 1
    provider.voucher_accepted()
    assert provider.payment_due(1) is None


def test_the_last_tokens_are_settled_before_done() -> None:
    window = Window(limit=3)
    client, provider = handshake(window)
    client.receive_frame(provider.tokens(chunks("a", "b", "c"))[0])
    ask = provider.payment_due(None)
    assert ask is not None and ask.delivered == 3
    window.paid = 3
    assert provider.payment_due(None) is None
    assert isinstance(client.receive_frame(provider.done("length", 0)), JobDone)


def test_an_exhausted_channel_is_settled_then_the_job_is_refused() -> None:
    window = Window(limit=2, deposit=2)
    _, provider = handshake(window)
    provider.tokens(chunks("a", "b"))
    ask = provider.payment_due(3)  # the deposit never pays for a third token
    assert ask is not None and ask.owed == 2  # ... so the two delivered are settled first
    window.paid = 2
    with pytest.raises(JobRefused) as info:
        provider.payment_due(3)
    assert info.value.code == "channel_exhausted"


def test_an_unknown_model_is_refused_before_the_prompt() -> None:
    key = PrivateKey.generate()
    client = ClientJob(bytes(key.public_key), "cd" * 32, "x", 4, {}, job_id=os.urandom(16))
    with pytest.raises(JobRefused) as info:
        ProviderJob(key, MODEL).receive_frame(client.open(None, None, None)[0])
    assert info.value.code == "unknown_model"


def test_a_prompt_that_ends_the_clients_stream_is_a_seal_error() -> None:
    key = PrivateKey.generate()
    client = ClientJob(bytes(key.public_key), MODEL, "x", 4, {}, job_id=os.urandom(16))
    open_msg, _ = client.open(None, None, None)
    provider = ProviderJob(key, MODEL)
    provider.receive_frame(open_msg)
    final = Sealed(client._sealer.seal({"k": "prompt", "prompt": "x"}, final=True))
    with pytest.raises(RemoteProtocolError) as info:
        provider.receive_frame(final)
    assert info.value.code == "seal"


@pytest.mark.parametrize("first", ["sealed", "voucher", "accept", "error"])
def test_anything_but_open_first_is_refused(first: str) -> None:
    frames: dict[str, Message] = {
        "sealed": Sealed(b"x" * 40),
        "voucher": VoucherMsg(b"boc"),
        "accept": Accept(header=b"h" * 24),
        "error": ErrorMsg("x", "y"),
    }
    with pytest.raises(RemoteProtocolError) as info:
        ProviderJob(PrivateKey.generate(), MODEL).receive_frame(frames[first])
    assert info.value.code == "schema"


def test_a_voucher_before_accept_is_refused() -> None:
    key = PrivateKey.generate()
    client = ClientJob(bytes(key.public_key), MODEL, "x", 4, {}, job_id=os.urandom(16))
    provider = ProviderJob(key, MODEL)
    for frame in client.open(None, None, None):
        provider.receive_frame(frame)
    with pytest.raises(RemoteProtocolError):
        provider.receive_frame(VoucherMsg(b"boc"))


def lie(provider: ProviderJob, body: dict[str, Any], *, final: bool = False) -> Sealed:
    """A body sealed by the provider's own sealer, whatever the machine would send."""
    assert provider._sealer is not None
    return Sealed(provider._sealer.seal(body, final=final))


def test_the_client_refuses_a_token_count_that_jumps() -> None:
    client, provider = handshake()
    with pytest.raises(RemoteProtocolError) as info:
        client.receive_frame(lie(provider, {"k": "tokens", "text": "abc", "n": 1, "total": 2}))
    assert "jumped" in str(info.value)


def test_the_client_refuses_more_tokens_than_the_text_could_hold() -> None:
    client, provider = handshake()
    with pytest.raises(RemoteProtocolError) as info:
        client.receive_frame(lie(provider, {"k": "tokens", "text": "ok", "n": 40, "total": 40}))
    assert "40 tokens for 2 bytes" in str(info.value)


def test_the_client_refuses_a_bill_for_tokens_it_never_got() -> None:
    client, provider = handshake()
    done = {"k": "done", "prompt_tokens": 3, "completion_tokens": 1,
            "finish_reason": "stop", "cost": 0}
    with pytest.raises(RemoteProtocolError) as info:
        client.receive_frame(lie(provider, done, final=True))
    assert "billed 1 tokens, delivered 0" in str(info.value)


def test_the_client_refuses_a_payment_request_for_tokens_it_never_got() -> None:
    client, _ = handshake()
    with pytest.raises(RemoteProtocolError):
        client.receive_frame(NeedPayment(owed=10, delivered=3))


def test_nothing_is_taken_after_done() -> None:
    client, provider = handshake()
    client.receive_frame(provider.done("stop", 0))
    with pytest.raises(RemoteProtocolError):
        client.receive_frame(Busy(1.0))


def test_a_busy_provider_ends_the_job() -> None:
    key = PrivateKey.generate()
    client = ClientJob(bytes(key.public_key), MODEL, "x", 4, {}, job_id=os.urandom(16))
    provider = ProviderJob(key, MODEL)
    for frame in client.open(None, None, None):
        provider.receive_frame(frame)
    assert client.receive_frame(provider.busy(2.5)).retry_after == 2.5  # type: ignore[union-attr]
    with pytest.raises(LocalProtocolError):
        provider.accept(Window(), 1, None)


# Whatever a peer sends, in whatever order, the machines answer with an event or a
# ProtocolError, never another exception.
frames_st = st.one_of(
    st.builds(Sealed, st.binary(max_size=64)),
    st.builds(VoucherMsg, st.binary(max_size=8)),
    st.builds(ErrorMsg, st.text(max_size=4), st.text(max_size=4)),
    st.builds(Busy, st.floats(0, 10)),
    st.builds(NeedPayment, st.integers(0, 9), st.integers(0, 9)),
    st.builds(Accept, st.binary(min_size=24, max_size=24)),
    st.builds(Open, st.binary(min_size=16, max_size=16), st.just(MODEL), st.just({}),
              st.integers(1, 9), st.none(), st.binary(min_size=32, max_size=32),
              st.binary(min_size=24, max_size=24)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(frames_st, max_size=6), st.booleans())
def test_random_frames_raise_only_protocol_errors(frames: list[Message], started: bool) -> None:
    if started:
        client, provider = handshake()
    else:
        key = PrivateKey.generate()
        client = ClientJob(bytes(key.public_key), MODEL, "x", 4, {}, job_id=os.urandom(16))
        client.open(None, None, None)
        provider = ProviderJob(key, MODEL)
    for machine in (client, provider):
        for frame in frames:
            try:
                machine.receive_frame(frame)
            except ProtocolError:
                break


# Stall detection -----------------------------------------------------------------------


def test_the_stall_bound_follows_the_providers_own_pace() -> None:
    stall = StallDetector(prompt_tokens=100)
    assert stall.timeout() == FIRST_TOKEN_FLOOR_S + 100 * 0.02
    stall.token_frame(40.0, first=True)  # queue and prefill say nothing about the pace
    assert stall.timeout() == STALL_FLOOR_S
    for _ in range(30):
        stall.token_frame(1.0, first=False)
    assert stall.timeout() == pytest.approx(STALL_GAP_FACTOR * 1.0, rel=0.01)
    for _ in range(30):
        stall.token_frame(100.0, first=False)
    assert stall.timeout() == TOKEN_TIMEOUT_S
    assert StallDetector(prompt_tokens=10**6).timeout() == TOKEN_TIMEOUT_S


class _ScriptedGeneration:
    def __init__(self, gaps: list[float], hang: bool) -> None:
        self._gaps = gaps
        self._hang = hang
        self._sent = 0

    def __aiter__(self) -> _ScriptedGeneration:
        return self

    async def __anext__(self) -> TokenChunk:
        if not self._gaps:
            if self._hang:
                await trio.sleep_forever()
            raise StopAsyncIteration
        await trio.sleep(self._gaps.pop(0))
        self._sent += 1
        return TokenChunk("a", 1)

    def ready(self) -> list[TokenChunk]:
        return []

    @property
    def finish_reason(self) -> str:
        return "stop"

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=0, completion_tokens=self._sent)


class _ScriptedEngine:
    """The Engine interface with a scripted pace: one token after each gap, then either
    the end or a hang (the provider stops sending without closing anything)."""

    def __init__(self, gaps: list[float], *, hang: bool) -> None:
        self._gaps = gaps
        self._hang = hang
        self.info = ModelInfo(model_id=MODEL, name="scripted", quant="F32", n_ctx=512,
                              path=__import__("pathlib").Path("/dev/null"))
        self.available = True

    @asynccontextmanager
    async def stream(self, prompt: str, params: SamplingParams,
                     max_tokens: int) -> AsyncIterator[_ScriptedGeneration]:
        yield _ScriptedGeneration(list(self._gaps), self._hang)

    async def count_tokens(self, text: str) -> int:
        return len(text)

    async def aclose(self) -> None:
        return None


async def _job_against(engine: _ScriptedEngine) -> tuple[list[float], JobError | int]:
    """Run one job over a memory stream; (arrival times of the tokens, the error or the
    completion token count)."""
    key = PrivateKey.generate()
    provider = JobProvider(engine, bytes(key), peer_id="provider")  # type: ignore[arg-type]
    left, right = trio.testing.memory_stream_pair()
    arrivals: list[float] = []

    async def on_text(_: str) -> None:
        arrivals.append(trio.current_time())

    outcome: JobError | int
    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider.handle_stream, MemoryNetStream(right))
        try:
            res = await run_job_on_stream(
                FramedStream(MemoryNetStream(left)),  # type: ignore[arg-type]
                ID(b"\x00\x01peer"), bytes(key.public_key),
                JobRequest(MODEL, "hello", 100, {"temperature": 0.0}), on_text=on_text,
            )
            outcome = res.usage.completion_tokens
        except JobError as exc:
            outcome = exc
        nursery.cancel_scope.cancel()
    return arrivals, outcome


async def test_a_provider_that_stops_sending_is_given_up_on_within_the_stall_floor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    arrivals, outcome = await _job_against(_ScriptedEngine([0.05] * 10, hang=True))
    assert isinstance(outcome, JobError) and outcome.code == "stalled"
    assert outcome.received_tokens == 10
    stalled_for = trio.current_time() - arrivals[-1]
    assert STALL_FLOOR_S <= stalled_for <= STALL_FLOOR_S + 0.1, stalled_for


async def test_a_steady_slow_provider_is_not_taken_for_a_stalled_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 0.2 s a token for a while, then one pause of 3 s (under 20 x its gap): not a stall.
    _, outcome = await _job_against(_ScriptedEngine([0.2] * 10 + [3.0, 0.2], hang=False))
    assert outcome == 12


async def test_a_provider_silent_before_its_first_token_is_given_up_on_within_the_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    start = trio.current_time()
    arrivals, outcome = await _job_against(_ScriptedEngine([], hang=True))
    assert isinstance(outcome, JobError) and outcome.code == "stalled"
    assert outcome.before_first_token and arrivals == []
    bound = StallDetector.for_prompt("hello").timeout()
    assert bound <= trio.current_time() - start <= bound + 0.1


class _WindowGate:
    """The PaymentGate interface over `Window`: one nanoton a token, vouchers carry the
    signed total as decimal text; records what happened in `log`."""

    def __init__(self, window: Window, log: list[str]) -> None:
        self.window = window
        self.log = log

    async def admit(self) -> None:
        return None

    async def start(self, prompt_tokens: int) -> None:
        return None

    @property
    def owed_before(self) -> int | None:
        return 0

    def may_produce(self, upto: int) -> bool:
        return self.window.may_produce(upto)

    def exhausted(self, upto: int) -> bool:
        return self.window.exhausted(upto)

    def ask(self, delivered: int, upto: int) -> int:
        return self.window.ask(delivered, upto)

    def settled(self, delivered: int) -> bool:
        return self.window.settled(delivered)

    async def accept_voucher(self, boc: bytes, delivered: int) -> None:
        self.window.paid = max(self.window.paid, int(boc))
        self.log.append(f"paid {self.window.paid}")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        return completion_tokens

    async def finish(self) -> None:
        return None


class _SigningPayer:
    """The Payer interface signing whatever is asked (as decimal text)."""

    channel_id = 1
    charged = 0

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def begin(self, prompt: str) -> None:
        return None

    def authorize(self, job_id: bytes, client_pub: bytes, provider_peer_id: str) -> bytes:
        return b"\0" * 64

    def channel_key(self) -> bytes:
        return b"\0" * 32

    def accepted(self, prompt_tokens: int | None, owed_before: int | None) -> None:
        return None

    async def voucher_for(self, owed: int, received: int) -> bytes:
        return str(owed).encode()

    def check_usage(self, usage: Any) -> None:
        self.log.append(f"done {usage.completion_tokens}")

    async def finish(self, received: int, complete: bool) -> None:
        return None


async def test_the_drivers_keep_tokens_within_the_window_and_settle_before_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    window = Window(limit=2)
    key = PrivateKey.generate()
    provider = JobProvider(_ScriptedEngine([0.01] * 7, hang=False), bytes(key),  # type: ignore[arg-type]
                           peer_id="provider",
                           gate_factory=lambda _open, _peer: _WindowGate(window, log))
    left, right = trio.testing.memory_stream_pair()

    async def on_text(text: str) -> None:
        log.append(f"token {len([e for e in log if e.startswith('token')]) + 1}")
        assert len([e for e in log if e.startswith("token")]) <= window.paid + window.limit

    async with trio.open_nursery() as nursery:
        nursery.start_soon(provider.handle_stream, MemoryNetStream(right))
        res = await run_job_on_stream(
            FramedStream(MemoryNetStream(left)),  # type: ignore[arg-type]
            ID(b"\x00\x01peer"), bytes(key.public_key),
            JobRequest(MODEL, "hello", 100, {"temperature": 0.0}), on_text=on_text,
            payer=_SigningPayer(log),  # type: ignore[arg-type]
        )
        nursery.cancel_scope.cancel()
    assert res.usage.completion_tokens == 7
    # Never more than two tokens on credit, and the last one paid for before the bill.
    assert log == ["token 1", "token 2", "paid 2", "token 3", "token 4", "paid 4", "token 5",
                   "token 6", "paid 6", "token 7", "paid 7", "done 7"]


def test_a_provider_body_larger_than_any_token_chunk_is_refused_before_it_is_unpacked() -> None:
    client, provider = handshake()
    huge = {"k": "tokens", "text": "a" * 400_000, "n": 1, "total": 1}
    with pytest.raises(RemoteProtocolError) as info:
        client.receive_frame(Sealed(provider._sealer.seal(huge)))
    assert info.value.code == "malformed_body"


async def test_a_job_that_would_outwait_the_clients_first_token_patience_gets_busy_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    key = PrivateKey.generate()
    # One slot; jobs of this provider take 40 s (40 tokens, 1 s each), as measured.
    provider = JobProvider(_ScriptedEngine([1.0] * 40, hang=False), bytes(key),  # type: ignore[arg-type]
                           peer_id="provider", slots=1)
    provider.stats.job_s = 40.0
    outcomes: dict[str, object] = {}

    async def one(name: str) -> None:
        left, right = trio.testing.memory_stream_pair()
        async with trio.open_nursery() as inner:
            inner.start_soon(provider.handle_stream, MemoryNetStream(right))
            try:
                res = await run_job_on_stream(
                    FramedStream(MemoryNetStream(left)),  # type: ignore[arg-type]
                    ID(b"\x00\x01peer"), bytes(key.public_key),
                    JobRequest(MODEL, "hello", 100, {"temperature": 0.0}))
                outcomes[name] = res.usage.completion_tokens
            except (JobError, ProviderBusy) as exc:
                outcomes[name] = exc
            inner.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "first")
        await trio.sleep(1.0)  # the first job holds the slot
        nursery.start_soon(one, "second")
    assert outcomes["first"] == 40
    # The second would have waited ~40 s for the slot, past MAX_QUEUE_WAIT_S: it is told
    # to come back (Retry-After), not accepted and then given up on as stalled.
    assert isinstance(outcomes["second"], ProviderBusy), outcomes["second"]


class _CountingNetStream(MemoryNetStream):
    def __init__(self, stream: trio.abc.Stream) -> None:
        super().__init__(stream)
        self.reads = 0

    async def read(self, n: int) -> bytes:
        self.reads += 1
        return await super().read(n)


async def test_frames_written_together_are_taken_in_one_read() -> None:
    """Each libp2p read costs ~0.1 ms of Python; a frame must not take one read for its
    length prefix and another for its body (Open + prompt arrive in one write)."""
    left, right = trio.testing.memory_stream_pair()
    reader = _CountingNetStream(right)
    frames: list[Message] = [ErrorMsg(code="a", msg="x" * 300), ErrorMsg(code="b")]
    await FramedStream(MemoryNetStream(left)).send_many(frames)  # type: ignore[arg-type]
    fs = FramedStream(reader)  # type: ignore[arg-type]
    assert [await fs.recv(1.0), await fs.recv(1.0)] == frames
    assert reader.reads == 1
