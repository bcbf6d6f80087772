"""Provider half of `/meshnode/job/1`: admit, decrypt, generate, stream sealed tokens.

One job per stream. Any protocol error (bad frame, bad seal, unexpected message) ends
that stream with a typed `Error` frame and a log line; it never reaches the node.
A concurrent reader watches the client: vouchers go to the payment gate, and a closed
or reset stream cancels generation, so a vanished client frees its slot at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from libp2p.abc import INetStream

from meshnode.core.crypto import Opener, Sealer, SealError, provider_session
from meshnode.core.messages import (
    Accept,
    Busy,
    ErrorMsg,
    NeedPayment,
    Open,
    SchemaError,
    Sealed,
    Usage,
    VoucherMsg,
    check_prompt_body,
)
from meshnode.core.wire import WireError
from meshnode.engine.base import (
    Engine,
    EngineUnavailable,
    InvalidRequest,
    PromptTooLong,
    SamplingParams,
    TokenChunk,
)
from meshnode.jobs.payment_gate import FreeGate, PaymentGate, PaymentRejected
from meshnode.p2p.framed import FramedStream, StreamClosed

log = logging.getLogger(__name__)

# A client sends Open and the sealed prompt back to back; 10 s covers a slow link.
OPEN_TIMEOUT_S = 10.0
# A client that was asked to pay answers within a round trip plus a signature.
PAYMENT_TIMEOUT_S = 30.0
# Busy's retry_after before any job has been timed: about one short job.
BUSY_RETRY_AFTER_S = 2.0
# retry_after comes from the real queue (mean job time x jobs ahead / slots), clamped:
# below 0.1 s a client would spin; past 60 s it should look elsewhere, not wait.
MIN_RETRY_AFTER_S = 0.1
MAX_RETRY_AFTER_S = 60.0
# Mean job time follows the last ~10 jobs.
JOB_TIME_EWMA_ALPHA = 0.1
# Recording a job's usage is one sqlite fsync; a disk slower than this is failing.
GATE_FINISH_TIMEOUT_S = 10.0
# Advertised speed follows the last ~5 jobs: steady against one odd prompt, quick to
# reflect a change of load or hardware.
SPEED_EWMA_ALPHA = 0.2
# A batch of queued chunks stays well inside the client's per-chunk text limit
# (messages.MAX_CHUNK_TEXT), so a long burst is split rather than refused.
MAX_BATCH_CHARS = 16 * 1024
MIN_DECODE_S = 1e-3  # guards the rate of a job whose tokens all arrived in one instant


class JobRefused(Exception):
    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code


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

    def _load_changed(self) -> None:
        if self.on_load_change is not None:
            self.on_load_change(self.active, self.queued)

    async def handle_stream(self, stream: INetStream) -> None:
        fs = FramedStream(stream)
        peer = _remote_peer(stream)
        try:
            await self._serve(fs, peer)
        except Exception as raised:  # every failure ends this stream, never the node
            await self._report(fs, peer, _leaf(raised))
        finally:
            await fs.close()

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
        if isinstance(exc, WireError | JobRefused | PaymentRejected):
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

    async def _serve(self, fs: FramedStream, peer: str) -> None:
        first = await fs.recv(OPEN_TIMEOUT_S)
        if not isinstance(first, Open):
            raise SchemaError(f"expected open, got {type(first).__name__}")
        if first.model_id != self.engine.info.model_id:
            raise JobRefused("unknown_model", f"model {first.model_id} is not served here")
        try:
            params = SamplingParams.from_dict(first.params)
        except ValueError as exc:
            raise JobRefused("bad_params", str(exc)) from exc
        keys = provider_session(self._job_key, first.client_pub)
        opener = Opener(keys.recv, first.header, ad=first.job_id)
        sealed = await fs.recv(OPEN_TIMEOUT_S)
        if not isinstance(sealed, Sealed):
            raise SchemaError(f"expected the sealed prompt, got {type(sealed).__name__}")
        body, final = opener.open(sealed.ciphertext)
        prompt = check_prompt_body(body)
        if final:
            raise SealError("the prompt must not end the client's sealed stream")

        gate = self._gate_factory(first, self.peer_id)
        # The channel's own checks and places come before ours: one channel's flood of
        # jobs is refused there instead of filling the queue every channel shares.
        await gate.admit()
        if self._admitted >= self.slots + self.max_queue:
            await gate.finish()
            self.stats.busy_refusals += 1
            await fs.send(Busy(retry_after=self.retry_after()))
            return
        self._admitted += 1
        self._load_changed()
        try:
            prompt_tokens = await self.engine.count_tokens(prompt)
            await gate.start(prompt_tokens)
            sealer = Sealer(keys.send, ad=first.job_id)
            owed_before = gate.owed_before
            await fs.send(Accept(
                header=sealer.header,
                prompt_tokens=None if owed_before is None else prompt_tokens,
                owed_before=owed_before,
            ))
            log.info("job %s from %s accepted", first.job_id.hex()[:8], peer)
            async with self._limiter:
                self._load_changed()
                started = trio.current_time()
                try:
                    await self._generate(fs, first, prompt, prompt_tokens, params, sealer,
                                         peer, gate)
                finally:
                    self.stats.observe_job_time(trio.current_time() - started)
        finally:
            # Shielded: a cancelled job must still record its usage and free its channel.
            with trio.CancelScope(shield=True), trio.move_on_after(GATE_FINISH_TIMEOUT_S):
                await gate.finish()
            self._admitted -= 1
            self._load_changed()

    async def _generate(
        self,
        fs: FramedStream,
        job: Open,
        prompt: str,
        prompt_tokens: int,
        params: SamplingParams,
        sealer: Sealer,
        peer: str,
        gate: PaymentGate,
    ) -> None:
        self.stats.jobs_started += 1
        self.stats.tokens_in += prompt_tokens
        live = LiveJob(job.job_id.hex(), peer, prompt_tokens, time.time())
        self.live.add(live)
        try:
            await self._generate_tokens(fs, job, prompt, prompt_tokens, params, sealer, peer,
                                        gate, live)
        finally:
            self.live.discard(live)

    async def _generate_tokens(
        self,
        fs: FramedStream,
        job: Open,
        prompt: str,
        prompt_tokens: int,
        params: SamplingParams,
        sealer: Sealer,
        peer: str,
        gate: PaymentGate,
        live: LiveJob,
    ) -> None:
        delivered = 0
        paid = trio.Event()
        client_gone: list[BaseException] = []

        async def watch_client(cancel: trio.CancelScope) -> None:
            nonlocal paid
            try:
                while True:
                    # No timeout of its own: this reader lives exactly as long as the
                    # generation, which is bounded by max_tokens and PAYMENT_TIMEOUT_S.
                    msg = await fs.recv(float("inf"))
                    if isinstance(msg, VoucherMsg):
                        await gate.accept_voucher(msg.boc, delivered)
                        paid.set()
                        paid = trio.Event()
                    elif isinstance(msg, ErrorMsg):
                        raise StreamClosed(f"client aborted: {msg.code}")
                    else:
                        raise SchemaError(f"unexpected {type(msg).__name__} during generation")
            except (StreamClosed, WireError, PaymentRejected) as exc:
                client_gone.append(exc)
                cancel.cancel()

        async def until_paid(upto: int, *, settle: bool = False) -> None:
            """Ask for payment and wait for vouchers until `upto` completion tokens may
            be out (or, with `settle`, the delivered ones are fully paid)."""
            while not (gate.settled(delivered) if settle else gate.may_produce(upto)):
                if not settle and gate.exhausted(upto):
                    # The deposit cannot pay for more: bill what went out, then stop.
                    await until_paid(delivered, settle=True)
                    raise JobRefused(
                        "channel_exhausted",
                        f"the channel's deposit pays for {delivered} tokens, no more: "
                        "open a new channel",
                    )
                waiting = paid
                owed = gate.ask(delivered, delivered if settle else upto)
                await fs.send(NeedPayment(owed=owed, delivered=delivered))
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
                async with self.engine.stream(prompt, params, job.max_tokens) as gen:
                    async for chunk in gen:
                        # Chunks the engine produced while we were sending go out as one
                        # sealed frame: per-frame cost, not per-token, when decode is fast.
                        pending = [chunk, *gen.ready()]
                        while pending:
                            await until_paid(delivered + pending[0].n_tokens)
                            batch = _payable_batch(pending, delivered, gate)
                            del pending[: len(batch)]
                            n = sum(c.n_tokens for c in batch)
                            if not delivered:
                                first_at = trio.current_time()
                            delivered += n
                            live.delivered = delivered
                            await fs.send(
                                Sealed(
                                    sealer.seal(
                                        {"k": "tokens", "text": "".join(c.text for c in batch),
                                         "n": n, "total": delivered}
                                    )
                                )
                            )
                finish = gen.finish_reason or "stop"
                # The last tokens went out on credit: settle them before Done.
                await until_paid(delivered, settle=True)
            self.stats.tokens_out += delivered
            if delivered > 1:
                self.stats.observe_speed((delivered - 1) / max(trio.current_time() - first_at,
                                                               MIN_DECODE_S))
            if client_gone:
                raise client_gone[0]
            usage = Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=delivered,
                finish_reason=finish,
                cost_nanoton=gate.cost(prompt_tokens, delivered),
            )
            await fs.send(Sealed(sealer.seal(usage.to_body(), final=True)))
            self.stats.jobs_completed += 1
            log.info("job %s for %s: %d+%d tokens", job.job_id.hex()[:8], peer,
                     prompt_tokens, delivered)
            nursery.cancel_scope.cancel()


def _payable_batch(
    pending: list[TokenChunk], delivered: int, gate: PaymentGate
) -> list[TokenChunk]:
    """The longest prefix of `pending` (at least one chunk, already paid for) that the
    credit window allows and that fits one token frame."""
    batch = [pending[0]]
    tokens, chars = delivered + pending[0].n_tokens, len(pending[0].text)
    for chunk in pending[1:]:
        tokens += chunk.n_tokens
        chars += len(chunk.text)
        if chars > MAX_BATCH_CHARS or not gate.may_produce(tokens):
            break
        batch.append(chunk)
    return batch


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
