"""Provider half of `/meshnode/job/1`: admit, decrypt, generate, stream sealed tokens.

A trio driver over `core.job_protocol.ProviderJob`, which holds every ordering rule
(what may be received or sent when, the credit window, settling before Done); this
module does the I/O, runs the engine and calls the payment gate. One job per stream. Any
protocol error (bad frame, bad seal, unexpected message) ends that stream with a typed
`Error` frame and a log line; it never reaches the node. A concurrent reader watches the
client: vouchers go to the payment gate, and a closed or reset stream cancels
generation, so a vanished client frees its slot at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from libp2p.abc import INetStream

from meshnode.core.job_protocol import (
    FIRST_TOKEN_FLOOR_S,
    OPEN_TIMEOUT_S,
    ClientAborted,
    JobRefused,
    LocalProtocolError,
    PromptReceived,
    ProtocolError,
    ProviderJob,
    VoucherReceived,
)
from meshnode.core.messages import Accept, ErrorMsg, Message, Open
from meshnode.core.wire import WireError
from meshnode.engine.base import (
    Engine,
    EngineUnavailable,
    Generation,
    InvalidRequest,
    PromptTooLong,
    SamplingParams,
)
from meshnode.jobs.payment_gate import FreeGate, PaymentGate, PaymentRejected
from meshnode.p2p.framed import FramedStream, StreamClosed

log = logging.getLogger(__name__)

# A client that was asked to pay answers within a round trip plus a signature.
PAYMENT_TIMEOUT_S = 30.0
# Busy's retry_after before any job has been timed: about one short job.
BUSY_RETRY_AFTER_S = 2.0
# retry_after comes from the real queue (mean job time x jobs ahead / slots), clamped:
# below 0.1 s a client would spin; past 60 s it should look elsewhere, not wait.
MIN_RETRY_AFTER_S = 0.1
MAX_RETRY_AFTER_S = 60.0
# The longest a job may expect to wait in the queue: half of the client's patience for a
# first token (core.job_protocol.FIRST_TOKEN_FLOOR_S), the other half left for prefill.
MAX_QUEUE_WAIT_S = FIRST_TOKEN_FLOOR_S / 2
# Mean job time follows the last ~10 jobs.
JOB_TIME_EWMA_ALPHA = 0.1
# A free job's prompt up to this long is not counted before Accept (its Accept would wait
# a round trip to the engine runner for a number nobody bills): the runner tokenizes it
# when the job starts, on its decode loop, in well under a millisecond at this size
# (~4k tokens). Longer ones are counted first, on the runner's tokenizer thread, so a
# stranger's long prompt never pauses the jobs decoding beside it.
COUNT_AT_START_MAX_CHARS = 16 * 1024
# Recording a job's usage is one sqlite fsync; a disk slower than this is failing.
GATE_FINISH_TIMEOUT_S = 10.0
# Advertised speed follows the last ~5 jobs: steady against one odd prompt, quick to
# reflect a change of load or hardware.
SPEED_EWMA_ALPHA = 0.2
MIN_DECODE_S = 1e-3  # guards the rate of a job whose tokens all arrived in one instant


@dataclass
class ProviderStats:
    jobs_started: int = 0
    jobs_completed: int = 0
    jobs_cancelled: int = 0
    busy_refusals: int = 0
    tokens_in: int = 0  # prompt tokens of the jobs that started generating
    tokens_out: int = 0
    tokens_per_s: float = 0.0  # EWMA of measured decode speed, advertised as capacity
    job_s: float = 0.0  # EWMA of how long an admitted job holds its slot
    errors: dict[str, int] = field(default_factory=dict)

    def observe_speed(self, sample: float) -> None:
        old = self.tokens_per_s
        self.tokens_per_s = sample if old == 0 else old + SPEED_EWMA_ALPHA * (sample - old)

    def observe_job_time(self, seconds: float) -> None:
        old = self.job_s
        self.job_s = seconds if old == 0 else old + JOB_TIME_EWMA_ALPHA * (seconds - old)

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


@dataclass(eq=False)  # by identity: two clients may pick the same job id
class LiveJob:
    """A job generating now, as the status page shows it."""

    job_id: str  # hex
    peer: str
    prompt_tokens: int
    started_at: float  # wall clock
    delivered: int = 0


GateFactory = Callable[[Open, str], PaymentGate]
"""(the job's Open, this provider's own peer id) → the job's gate; the peer id is what a
channel's job proof must name (core.channel_auth)."""


class JobProvider:
    def __init__(
        self,
        engine: Engine,
        job_key_secret: bytes,
        *,
        peer_id: str,
        slots: int = 1,
        max_queue: int = 4,
        gate_factory: GateFactory | None = None,
    ) -> None:
        from nacl.public import PrivateKey

        self.engine = engine
        self._job_key = PrivateKey(job_key_secret)
        self.peer_id = peer_id
        self.slots = slots
        self.max_queue = max_queue
        self._limiter = trio.CapacityLimiter(slots)
        self._admitted = 0
        self._gate_factory = gate_factory or (lambda _open, _peer: FreeGate())
        self.stats = ProviderStats()
        self.live: set[LiveJob] = set()  # the jobs generating now
        self.on_load_change: Callable[[int, int], None] | None = None
        # How long a new stream may wait for its Open (tests shorten it).
        self.open_timeout_s = OPEN_TIMEOUT_S
        self._streams = 0  # job streams being handled now (from their Open on)
        self._quiet = trio.Event()  # set (and replaced) when _streams drops to 0

    @property
    def active(self) -> int:
        return int(self._limiter.borrowed_tokens)

    @property
    def queued(self) -> int:
        return self._admitted - self.active

    def retry_after(self) -> float:
        """When a refused client may expect a free place: the jobs ahead of it (all
        queued plus itself) drain through the slots at the measured mean job time."""
        if self.stats.job_s <= 0:
            return BUSY_RETRY_AFTER_S
        ahead = self.queued + 1
        estimate = self.stats.job_s * ahead / max(1, self.slots)
        return min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, estimate))

    def _queue_wait_too_long(self) -> bool:
        """Whether a new job would wait in the queue past MAX_QUEUE_WAIT_S. Accept goes
        out before the wait, and a client gives up on a first token after
        FIRST_TOKEN_FLOOR_S: such a job is refused now with a Retry-After, instead of
        being given up on as stalled (and its prefill run for nobody)."""
        if self._admitted < self.slots or self.stats.job_s <= 0:
            return False  # a slot is free, or nothing measured yet
        return self.stats.job_s * (self.queued + 1) / self.slots > MAX_QUEUE_WAIT_S

    def _load_changed(self) -> None:
        if self.on_load_change is not None:
            self.on_load_change(self.active, self.queued)

    async def handle_stream(self, stream: INetStream) -> None:
        fs = FramedStream(stream)
        peer = _remote_peer(stream)
        counted = False
        try:
            try:
                # A client may open its next job's stream ahead (a spare): until its Open
                # arrives this is no job, and a spare closed unused is no cancelled job.
                first = await fs.recv(self.open_timeout_s)
            except StreamClosed:
                log.debug("job stream from %s closed before its Open", peer)
                return
            self._streams += 1
            counted = True
            await self._serve(fs, peer, first)
        except Exception as raised:  # every failure ends this stream, never the node
            await self._report(fs, peer, _leaf(raised))
        finally:
            try:
                await fs.close()
            finally:  # counted down even when the close is cancelled (node stopping)
                if counted:
                    self._streams -= 1
                    if not self._streams:
                        self._quiet.set()
                        self._quiet = trio.Event()

    async def wait_quiet(self) -> None:
        """Return once no job stream is being handled: every job that started has ended
        and been counted (stats), its usage recorded and its stream closed."""
        while self._streams:
            await self._quiet.wait()

    async def _report(self, fs: FramedStream, peer: str, exc: BaseException) -> None:
        if isinstance(exc, StreamClosed):
            self.stats.jobs_cancelled += 1
            log.info("client %s went away: %s", peer, exc)
            return
        if isinstance(exc, EngineUnavailable):
            exc = JobRefused("engine_unavailable", str(exc))
        elif isinstance(exc, PromptTooLong):
            exc = JobRefused("prompt_too_long", str(exc))
        elif isinstance(exc, InvalidRequest):  # includes bad sampling params for this model
            exc = JobRefused("bad_request", str(exc))
        if isinstance(exc, LocalProtocolError):
            code, msg = "internal", "internal error"
            log.error("job from %s broke the protocol on our side", peer, exc_info=exc)
        elif isinstance(exc, WireError | ProtocolError | PaymentRejected):
            code = getattr(exc, "code", "protocol")
            log.warning("job stream from %s closed: %s: %s", peer, code, exc)
            msg = str(exc)
        elif isinstance(exc, trio.TooSlowError):
            code, msg = "timeout", "peer too slow"
            log.warning("job stream from %s timed out", peer)
        else:
            code, msg = "internal", type(exc).__name__
            log.error("job from %s failed", peer, exc_info=exc)
        self.stats.count_error(code)
        await _try_send(fs, ErrorMsg(code=code, msg=msg))

    async def _serve(self, fs: FramedStream, peer: str, open_frame: Message) -> None:
        job = ProviderJob(self._job_key, self.engine.info.model_id)
        job.receive_frame(open_frame)
        first = job.open
        assert first is not None
        try:
            params = SamplingParams.from_dict(first.params)
        except ValueError as exc:
            raise JobRefused("bad_params", str(exc)) from exc
        got = job.receive_frame(await fs.recv(OPEN_TIMEOUT_S))
        assert isinstance(got, PromptReceived)
        prompt = got.prompt

        gate = self._gate_factory(first, self.peer_id)
        # The channel's own checks and places come before ours: one channel's flood of
        # jobs is refused there instead of filling the queue every channel shares.
        await gate.admit()
        if self._admitted >= self.slots + self.max_queue or self._queue_wait_too_long():
            await gate.finish()
            self.stats.busy_refusals += 1
            await fs.send(job.busy(self.retry_after()))
            return
        self._admitted += 1
        self._load_changed()
        try:
            counted = not (isinstance(gate, FreeGate)
                           and len(prompt) <= COUNT_AT_START_MAX_CHARS)
            prompt_tokens = await self._count_prompt_tokens(prompt) if counted else 0
            await gate.start(prompt_tokens)
            accept_msg = job.accept(gate, prompt_tokens, gate.owed_before)
            # With a slot free and nothing owed before the prompt, the engine starts on the
            # prompt first and Accept is written while it works: the write (~0.3 ms of
            # Noise and yamux here) leaves the time to first token. Otherwise Accept goes
            # now, before the wait for a slot or a voucher.
            accept: Accept | None = accept_msg
            if not (self._limiter.available_tokens and gate.may_produce(0)):
                await fs.send(accept_msg)
                accept = None
            log.info("job %s from %s accepted", first.job_id.hex()[:8], peer)
            async with self._limiter:
                self._load_changed()
                started = trio.current_time()
                try:
                    await self._generate(fs, job, prompt, params, peer, gate, accept)
                finally:
                    self.stats.observe_job_time(trio.current_time() - started)
        finally:
            # Shielded: a cancelled job must still record its usage and free its channel.
            with trio.CancelScope(shield=True), trio.move_on_after(GATE_FINISH_TIMEOUT_S):
                await gate.finish()
            self._admitted -= 1
            self._load_changed()

    async def _count_prompt_tokens(self, prompt: str) -> int:
        """The prompt's token count, the basis of its bill (the one tokenizer call)."""
        return await self.engine.count_tokens(prompt)

    def _learn_prompt_tokens(self, job: ProviderJob, gen: Generation, live: LiveJob) -> None:
        """A free job accepted uncounted takes its count from the engine (the same
        tokenizer call, made as the job started)."""
        if job.priced or job.prompt_tokens:
            return
        engine_count = gen.usage.prompt_tokens
        if not engine_count:
            return
        job.prompt_counted(engine_count)
        live.prompt_tokens = engine_count
        self.stats.tokens_in += engine_count

    async def _generate(
        self,
        fs: FramedStream,
        job: ProviderJob,
        prompt: str,
        params: SamplingParams,
        peer: str,
        gate: PaymentGate,
        accept: Accept | None,
    ) -> None:
        assert job.open is not None
        self.stats.jobs_started += 1
        self.stats.tokens_in += job.prompt_tokens
        live = LiveJob(job.open.job_id.hex(), peer, job.prompt_tokens, time.time())
        self.live.add(live)
        try:
            await self._generate_tokens(fs, job, prompt, params, peer, gate, live, accept)
        finally:
            self.live.discard(live)

    async def _generate_tokens(
        self,
        fs: FramedStream,
        job: ProviderJob,
        prompt: str,
        params: SamplingParams,
        peer: str,
        gate: PaymentGate,
        live: LiveJob,
        accept: Accept | None,
    ) -> None:
        assert job.open is not None
        paid = trio.Event()
        client_gone: list[BaseException] = []

        async def watch_client(cancel: trio.CancelScope) -> None:
            nonlocal paid
            try:
                while True:
                    # No timeout of its own: this reader lives exactly as long as the
                    # generation, which is bounded by max_tokens and PAYMENT_TIMEOUT_S.
                    event = job.receive_frame(await fs.recv(float("inf")))
                    if isinstance(event, VoucherReceived):
                        await gate.accept_voucher(event.boc, job.delivered)
                        job.voucher_accepted()
                        paid.set()
                        paid = trio.Event()
                    elif isinstance(event, ClientAborted):
                        raise StreamClosed(f"client aborted: {event.code}")
            except (StreamClosed, WireError, PaymentRejected, ProtocolError) as exc:
                client_gone.append(exc)
                cancel.cancel()

        async def until_paid(upto: int | None) -> None:
            """Ask for payment and wait for vouchers until `upto` completion tokens may
            be out (None: until the delivered ones are fully paid)."""
            while (ask := job.payment_due(upto)) is not None:
                waiting = paid
                await fs.send(ask)
                with trio.fail_after(PAYMENT_TIMEOUT_S):
                    await waiting.wait()

        finish = "stop"
        first_at = 0.0
        async with trio.open_nursery() as nursery:
            gen_scope = trio.CancelScope()
            nursery.start_soon(watch_client, gen_scope)
            with gen_scope:
                # The prompt is the first thing the client owes: a prompt costing more than
                # the credit window is paid for before llama.cpp spends time on it.
                await until_paid(0)
                async with self.engine.stream(prompt, params, job.open.max_tokens) as gen:
                    if accept is not None:  # held back while the engine was asked to start
                        await fs.send(accept)
                    async for chunk in gen:
                        # Chunks the engine produced while we were sending go out as one
                        # sealed frame: per-frame cost, not per-token, when decode is fast.
                        pending = [chunk, *gen.ready()]
                        if not job.delivered:
                            self._learn_prompt_tokens(job, gen, live)
                        while pending:
                            await until_paid(job.delivered + pending[0].n_tokens)
                            if not job.delivered:
                                first_at = trio.current_time()
                            frame, taken = job.tokens(pending)
                            del pending[:taken]
                            live.delivered = job.delivered
                            await fs.send(frame)
                finish = gen.finish_reason or "stop"
                self._learn_prompt_tokens(job, gen, live)
                # The last tokens went out on credit: settle them before Done.
                await until_paid(None)
            delivered = job.delivered
            self.stats.tokens_out += delivered
            if delivered > 1:
                self.stats.observe_speed((delivered - 1) / max(trio.current_time() - first_at,
                                                               MIN_DECODE_S))
            if client_gone:
                raise client_gone[0]
            await fs.send(job.done(finish, gate.cost(job.prompt_tokens, delivered)))
            self.stats.jobs_completed += 1
            log.info("job %s for %s: %d+%d tokens", job.open.job_id.hex()[:8], peer,
                     job.prompt_tokens, delivered)
            nursery.cancel_scope.cancel()


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside nested exception groups (from the job's nursery)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _remote_peer(stream: INetStream) -> str:
    try:
        return str(stream.muxed_conn.peer_id)
    except AttributeError:
        return "?"


async def _try_send(fs: FramedStream, msg: ErrorMsg) -> None:
    with trio.move_on_after(1.0):
        try:
            await fs.send(msg)
        except Exception:  # the peer may already be gone; the log line has the reason
            pass
