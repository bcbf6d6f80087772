"""The ordering rules of `/meshnode/job/1` as two sans-io state machines.

Everything that decides what may be sent or received when lives here; `jobs/provider.py`
and `jobs/client.py` only move frames between these machines and a stream, run the
engine, talk to the payment layer and keep time. The conversation:

    client                                   provider
    Open (in clear) ─────────────────────────▶
    Sealed(prompt) ──────────────────────────▶
                    ◀──────────────────────── Accept | Busy | Error
                    ◀──────────────────────── NeedPayment        (any number, each
    Voucher ─────────────────────────────────▶                    answered by a Voucher)
                    ◀──────────────────────── Sealed(tokens) …   (within the credit window)
                    ◀──────────────────────── Sealed(done, final) (only once settled) | Error
    Error (the client gives up) ─────────────▶

Machines never do I/O and never read a clock. Frames go in as parsed `Message`s
(`meshnode.core.messages.parse_message`) and come out as `Message`s to send. Whatever a
peer sends that breaks the rules raises `RemoteProtocolError`; a driver that breaks
them (sends tokens past the credit window, Done before settling) gets
`LocalProtocolError`; a job that cannot go on for a stated reason gets `JobRefused`.
All three are `ProtocolError`, which carries the stable `code` sent in an Error frame.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from nacl.public import PrivateKey

from meshnode.core.crypto import Opener, Sealer, SealError, client_session, provider_session
from meshnode.core.errors import MeshnodeError
from meshnode.core.messages import (
    JOB_ID_BYTES,
    MAX_CHUNK_TEXT,
    Accept,
    Busy,
    ErrorMsg,
    Message,
    NeedPayment,
    Open,
    Sealed,
    Usage,
    VoucherMsg,
    check_done_body,
    check_prompt_body,
    check_tokens_body,
)
from meshnode.core.wire import WireError

# A batch of queued chunks stays well inside the client's per-chunk text limit
# (messages.MAX_CHUNK_TEXT), so a long burst is split rather than refused.
MAX_BATCH_CHARS = 16 * 1024
# Tokens billed beyond the text's byte count: none in practice; a little room for a
# tokenizer that maps a token to an empty piece now and then.
TOKEN_COUNT_SLACK = 8
# The largest body a provider may send the client: one token chunk of MAX_CHUNK_TEXT
# characters at 4 UTF-8 bytes each, plus its few small fields. A tighter bound than the
# generic sealed-body limit, so a hostile provider cannot make the client inflate 1 MiB.
MAX_PROVIDER_BODY_BYTES = MAX_CHUNK_TEXT * 4 + 1024


class ProtocolError(MeshnodeError):
    """The job cannot go on; `code` is the stable reason an Error frame carries."""

    label = "job protocol error"

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow here."""


class LocalProtocolError(ProtocolError):
    """The driver asked for something the protocol does not allow (a bug in the driver)."""

    def __init__(self, msg: str) -> None:
        super().__init__("internal", msg)


class JobRefused(ProtocolError):
    """The provider will not run (or continue) this job; `code` says why."""


@contextmanager
def _from_peer() -> Iterator[None]:
    """Bad input found by the message and seal checks reads as the peer's fault."""
    try:
        yield
    except WireError as exc:
        raise RemoteProtocolError(exc.code, str(exc)) from exc


class Chunk(Protocol):
    """A piece of generated text (`engine.base.TokenChunk` is one)."""

    @property
    def text(self) -> str: ...

    @property
    def n_tokens(self) -> int: ...


class CreditWindow(Protocol):
    """The synchronous half of the provider's payment gate (`jobs.payment_gate`): how far
    a job may run before the client pays. Counts are completion tokens."""

    def may_produce(self, upto: int) -> bool: ...

    def exhausted(self, upto: int) -> bool: ...

    def ask(self, delivered: int, upto: int) -> int: ...

    def settled(self, delivered: int) -> bool: ...


class FreeWindow:
    """No payment: every token may go out at once."""

    def may_produce(self, upto: int) -> bool:
        return True

    def exhausted(self, upto: int) -> bool:
        return False

    def ask(self, delivered: int, upto: int) -> int:
        return 0

    def settled(self, delivered: int) -> bool:
        return True


# Events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenReceived:
    """Provider: the client's Open (model checked; the driver checks the params)."""

    open: Open


@dataclass(frozen=True)
class PromptReceived:
    """Provider: the decrypted prompt; next the driver answers `busy()` or `accept()`."""

    prompt: str


@dataclass(frozen=True)
class VoucherReceived:
    """Provider: a voucher to check; call `voucher_accepted()` once the gate took it."""

    boc: bytes


@dataclass(frozen=True)
class ClientAborted:
    """Provider: the client closed the job with an Error frame."""

    code: str


@dataclass(frozen=True)
class Accepted:
    """Client: the provider admitted the job (its bill's basis, when priced)."""

    prompt_tokens: int | None
    owed_before: int | None


@dataclass(frozen=True)
class ProviderBusy:
    """Client: no room at the provider; the job is over."""

    retry_after: float


@dataclass(frozen=True)
class ProviderFailed:
    """Client: the provider closed the job with an Error frame; the job is over."""

    code: str
    msg: str


@dataclass(frozen=True)
class TokensReceived:
    """Client: a piece of the answer; `total` completion tokens received so far."""

    text: str
    n: int
    total: int


@dataclass(frozen=True)
class PaymentRequested:
    """Client: the provider waits for a voucher covering `owed` nanoton; answer with
    `voucher(boc)` before the next frame."""

    owed: int
    delivered: int


@dataclass(frozen=True)
class JobDone:
    """Client: the provider's final bill, checked against what arrived; the job is over."""

    usage: Usage


ProviderEvent = OpenReceived | PromptReceived | VoucherReceived | ClientAborted
ClientEvent = Accepted | ProviderBusy | ProviderFailed | TokensReceived | PaymentRequested | JobDone


class ProviderState(enum.Enum):
    AWAIT_OPEN = "await_open"
    AWAIT_PROMPT = "await_prompt"
    ADMITTING = "admitting"  # prompt in; the driver answers busy() or accept()
    GENERATING = "generating"  # tokens, payment requests and vouchers
    CLOSED = "closed"  # Done, Busy or Error sent


class ClientState(enum.Enum):
    IDLE = "idle"  # open() not called yet
    AWAIT_ACCEPT = "await_accept"
    STREAMING = "streaming"
    OWES_VOUCHER = "owes_voucher"  # a NeedPayment is waiting for voucher()
    CLOSED = "closed"  # Done, Busy or Error received (or sent)


def _unexpected(msg: object, state: enum.Enum) -> RemoteProtocolError:
    kind = type(msg).__name__ if isinstance(msg, Message) else "non-message"
    return RemoteProtocolError("schema", f"unexpected {kind} in state {state.value}")


class ProviderJob:
    """The provider's side of one job.

    Drive it like this (see `jobs.provider.JobProvider._serve`):

        job = ProviderJob(job_key, served_model_id)
        job.receive_frame(open_msg)         -> OpenReceived   (unknown model: JobRefused)
        job.receive_frame(sealed_prompt)    -> PromptReceived
        send(job.busy(retry_after))         # and stop; or:
        send(job.accept(window, prompt_tokens, owed_before))
        job.prompt_counted(n)               # a free job accepted before its prompt was counted
        while generating:
            while (ask := job.payment_due(upto)) is not None:   # upto=None: settle all
                send(ask); wait for a voucher
            frame, used = job.tokens(pending_chunks); send(frame)
        meanwhile, for each frame from the client:
            job.receive_frame(msg) -> VoucherReceived (check it, then voucher_accepted())
                                    | ClientAborted
        send(job.done(finish_reason, cost))   # only once payment_due(None) is None
        send(job.error(code, msg))            # at any point, instead

    `receive_frame` raises only `ProtocolError` (`RemoteProtocolError` for frames the
    state does not allow, bad seals and bad bodies; `JobRefused` for an unknown model);
    after any raise the machine is closed. The credit window (`CreditWindow`, the
    payment gate's synchronous half) decides how far tokens may run ahead of vouchers.
    """

    def __init__(self, job_key: PrivateKey, model_id: str) -> None:
        self._job_key = job_key
        self._model_id = model_id
        self.state = ProviderState.AWAIT_OPEN
        self.open: Open | None = None
        self.prompt_tokens = 0
        self.priced = False  # Accept stated a bill's basis (owed_before was given)
        self.delivered = 0  # completion tokens sent
        self.vouchers = 0  # vouchers the gate accepted
        self._opener: Opener | None = None
        self._send_key = b""
        self._sealer: Sealer | None = None
        self._window: CreditWindow = FreeWindow()
        self._exhausted = False
        self.payment_pending = False  # a NeedPayment is out, no voucher since

    # Frames from the client -----------------------------------------------------------

    def receive_frame(self, msg: Message) -> ProviderEvent:
        try:
            return self._receive(msg)
        except ProtocolError:
            self.state = ProviderState.CLOSED
            raise

    def _receive(self, msg: Message) -> ProviderEvent:
        state = self.state
        if state is ProviderState.AWAIT_OPEN and isinstance(msg, Open):
            if msg.model_id != self._model_id:
                raise JobRefused("unknown_model", f"model {msg.model_id} is not served here")
            with _from_peer():
                keys = provider_session(self._job_key, msg.client_pub)
                self._opener = Opener(keys.recv, msg.header, ad=msg.job_id)
            self._send_key = keys.send
            self.open = msg
            self.state = ProviderState.AWAIT_PROMPT
            return OpenReceived(msg)
        if state is ProviderState.AWAIT_PROMPT and isinstance(msg, Sealed):
            assert self._opener is not None
            with _from_peer():
                body, final = self._opener.open(msg.ciphertext)
                prompt = check_prompt_body(body)
                if final:
                    raise SealError("the prompt must not end the client's sealed stream")
            self.state = ProviderState.ADMITTING
            return PromptReceived(prompt)
        if state is ProviderState.GENERATING and isinstance(msg, VoucherMsg):
            return VoucherReceived(msg.boc)
        if state is ProviderState.GENERATING and isinstance(msg, ErrorMsg):
            self.state = ProviderState.CLOSED
            return ClientAborted(msg.code)
        if state is ProviderState.AWAIT_OPEN:
            raise RemoteProtocolError("schema", f"expected open, got {type(msg).__name__}")
        if state is ProviderState.AWAIT_PROMPT:
            raise RemoteProtocolError(
                "schema", f"expected the sealed prompt, got {type(msg).__name__}"
            )
        raise _unexpected(msg, state)

    def voucher_accepted(self) -> None:
        """The gate checked and recorded the last `VoucherReceived`."""
        if self.state is not ProviderState.GENERATING:
            raise LocalProtocolError(f"voucher accepted in state {self.state.value}")
        self.vouchers += 1
        self.payment_pending = False

    # Frames to the client -------------------------------------------------------------

    def busy(self, retry_after: float) -> Busy:
        self._expect(ProviderState.ADMITTING, "busy")
        self.state = ProviderState.CLOSED
        return Busy(retry_after=retry_after)

    def accept(
        self, window: CreditWindow, prompt_tokens: int, owed_before: int | None
    ) -> Accept:
        """Admit the job. A priced provider (`owed_before` not None) states the prompt's
        token count as the basis of its bill."""
        self._expect(ProviderState.ADMITTING, "accept")
        assert self.open is not None
        self._window = window
        self.prompt_tokens = prompt_tokens
        self.priced = owed_before is not None
        self._sealer = Sealer(self._send_key, ad=self.open.job_id)
        self.state = ProviderState.GENERATING
        return Accept(
            header=self._sealer.header,
            prompt_tokens=None if owed_before is None else prompt_tokens,
            owed_before=owed_before,
        )

    def prompt_counted(self, prompt_tokens: int) -> None:
        """A free job's prompt count, learnt from the engine after Accept (Done reports
        it). A priced job's count is its bill's basis, fixed at Accept."""
        self._expect(ProviderState.GENERATING, "prompt_counted")
        if self.priced:
            raise LocalProtocolError("a priced job's prompt count was fixed at accept")
        self.prompt_tokens = prompt_tokens

    def payment_due(self, upto: int | None) -> NeedPayment | None:
        """None when `upto` completion tokens may be out (`upto=None`: when everything
        delivered is paid, so Done may follow). Otherwise the NeedPayment to send before
        waiting for a voucher. A channel whose deposit can never pay for `upto` is
        settled up to what was delivered, then the job ends with
        JobRefused("channel_exhausted")."""
        self._expect(ProviderState.GENERATING, "payment_due")
        w = self._window
        if upto is not None and not self._exhausted:
            if upto < self.delivered:
                raise LocalProtocolError(f"payment asked up to {upto} < {self.delivered} sent")
            if w.may_produce(upto):
                return None
            self._exhausted = w.exhausted(upto)
        if self._exhausted or upto is None:
            if w.settled(self.delivered):
                if self._exhausted:
                    raise JobRefused(
                        "channel_exhausted",
                        f"the channel's deposit pays for {self.delivered} tokens, no more: "
                        "open a new channel",
                    )
                return None
            target = self.delivered
        else:
            target = upto
        self.payment_pending = True
        return NeedPayment(owed=w.ask(self.delivered, target), delivered=self.delivered)

    def tokens(self, pending: Sequence[Chunk]) -> tuple[Sealed, int]:
        """One sealed token frame: the longest prefix of `pending` (at least its first
        chunk, which must already be paid for) that the credit window allows and that
        fits one frame. Returns the frame and how many chunks it took."""
        self._expect(ProviderState.GENERATING, "tokens")
        assert self._sealer is not None
        if not pending:
            raise LocalProtocolError("no tokens to send")
        first = pending[0]
        if first.n_tokens < 1 or not first.text:
            raise LocalProtocolError("a token chunk carries text and at least one token")
        tokens = self.delivered + first.n_tokens
        if self._exhausted or not self._window.may_produce(tokens):
            raise LocalProtocolError(f"{tokens} tokens would outrun the credit window")
        chars = len(first.text)
        taken = 1
        for chunk in pending[1:]:
            if chunk.n_tokens < 1 or not chunk.text:
                break
            tokens += chunk.n_tokens
            chars += len(chunk.text)
            if chars > MAX_BATCH_CHARS or not self._window.may_produce(tokens):
                break
            taken += 1
        batch = pending[:taken]
        n = sum(c.n_tokens for c in batch)
        self.delivered += n
        body = {"k": "tokens", "text": "".join(c.text for c in batch), "n": n,
                "total": self.delivered}
        return Sealed(self._sealer.seal(body)), taken

    def done(self, finish_reason: str, cost_nanoton: int) -> Sealed:
        """The final sealed frame with the bill; only once nothing is left on credit."""
        self._expect(ProviderState.GENERATING, "done")
        assert self._sealer is not None
        if not self._window.settled(self.delivered):
            raise LocalProtocolError(f"done before the {self.delivered} tokens were paid")
        usage = Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.delivered,
            finish_reason=finish_reason,
            cost_nanoton=cost_nanoton,
        )
        self.state = ProviderState.CLOSED
        return Sealed(self._sealer.seal(usage.to_body(), final=True))

    def error(self, code: str, msg: str) -> ErrorMsg:
        """End the job with an Error frame (allowed in any state)."""
        self.state = ProviderState.CLOSED
        return ErrorMsg(code=code, msg=msg)

    def _expect(self, state: ProviderState, action: str) -> None:
        if self.state is not state:
            raise LocalProtocolError(f"{action} in state {self.state.value}")


class ClientJob:
    """The client's side of one job.

    Drive it like this (see `jobs.client.run_job`):

        job = ClientJob(provider_job_pub, model_id, prompt, max_tokens, params)
        for frame in job.open(channel_id, auth, channel_key): send(frame)
            # job.job_id and job.client_pub are known before open(), for the channel proof
        loop: job.receive_frame(msg) ->
            Accepted                     (check the bill's basis)
            TokensReceived               (show the text)
            PaymentRequested             -> send(job.voucher(boc)) before reading on
            JobDone | ProviderBusy | ProviderFailed   (the job is over)
        send(job.abort(code, msg))       # the client gives up (optional)

    `job_id` (random by default) and `ephemeral` (the client's X25519 key, fresh by
    default) may be fixed for tests. `receive_frame` raises only `ProtocolError`:
    `RemoteProtocolError` for a frame the state does not allow, a bad seal or body, a
    token count that does not add up or that bills more tokens than the text could hold,
    a Done whose bill differs from what arrived; `LocalProtocolError` for a frame read
    while a voucher is owed. After a raise the machine is closed.
    """

    def __init__(
        self,
        provider_job_pub: bytes,
        model_id: str,
        prompt: str,
        max_tokens: int,
        params: dict[str, Any],
        *,
        job_id: bytes | None = None,
        ephemeral: PrivateKey | None = None,
    ) -> None:
        self.job_id: bytes = os.urandom(JOB_ID_BYTES) if job_id is None else job_id
        self._ephemeral = ephemeral or PrivateKey.generate()
        self._keys = client_session(self._ephemeral, provider_job_pub)
        self._sealer = Sealer(self._keys.send, ad=self.job_id)
        self._opener: Opener | None = None
        self.model_id = model_id
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.params = params
        self.state = ClientState.IDLE
        self.received = 0  # completion tokens received
        self.text_bytes = 0
        self.owed: int | None = None  # the open NeedPayment's amount

    @property
    def client_pub(self) -> bytes:
        return bytes(self._ephemeral.public_key)

    def open(
        self, channel_id: int | None, auth: bytes | None, channel_key: bytes | None
    ) -> list[Message]:
        """The Open and the sealed prompt, to send back to back."""
        if self.state is not ClientState.IDLE:
            raise LocalProtocolError(f"open in state {self.state.value}")
        self.state = ClientState.AWAIT_ACCEPT
        return [
            Open(
                job_id=self.job_id,
                model_id=self.model_id,
                params=self.params,
                max_tokens=self.max_tokens,
                channel_id=channel_id,
                client_pub=self.client_pub,
                header=self._sealer.header,
                auth=auth,
                channel_key=channel_key,
            ),
            Sealed(self._sealer.seal({"k": "prompt", "prompt": self.prompt})),
        ]

    def receive_frame(self, msg: Message) -> ClientEvent:
        try:
            return self._receive(msg)
        except ProtocolError:
            self.state = ClientState.CLOSED
            raise

    def _receive(self, msg: Message) -> ClientEvent:
        state = self.state
        if state is ClientState.AWAIT_ACCEPT:
            if isinstance(msg, Busy):
                self.state = ClientState.CLOSED
                return ProviderBusy(msg.retry_after)
            if isinstance(msg, ErrorMsg):
                self.state = ClientState.CLOSED
                return ProviderFailed(msg.code, msg.msg)
            if not isinstance(msg, Accept):
                raise RemoteProtocolError("schema", f"expected accept, got {type(msg).__name__}")
            with _from_peer():
                self._opener = Opener(self._keys.recv, msg.header, ad=self.job_id)
            self.state = ClientState.STREAMING
            return Accepted(msg.prompt_tokens, msg.owed_before)
        if state is ClientState.STREAMING:
            if isinstance(msg, Sealed):
                return self._sealed(msg)
            if isinstance(msg, NeedPayment):
                if msg.delivered != self.received:
                    raise RemoteProtocolError(
                        "schema",
                        f"provider claims {msg.delivered} delivered, saw {self.received}",
                    )
                self.state = ClientState.OWES_VOUCHER
                self.owed = msg.owed
                return PaymentRequested(msg.owed, msg.delivered)
            if isinstance(msg, ErrorMsg):
                self.state = ClientState.CLOSED
                return ProviderFailed(msg.code, msg.msg)
            raise RemoteProtocolError("schema", f"unexpected {type(msg).__name__} from provider")
        if state is ClientState.OWES_VOUCHER:
            raise LocalProtocolError("a frame read before the voucher was sent")
        raise _unexpected(msg, state)

    def _sealed(self, msg: Sealed) -> ClientEvent:
        assert self._opener is not None
        with _from_peer():
            body, final = self._opener.open(msg.ciphertext, MAX_PROVIDER_BODY_BYTES)
            if final:
                usage = check_done_body(body)
                if usage.completion_tokens != self.received:
                    raise RemoteProtocolError(
                        "schema",
                        f"provider billed {usage.completion_tokens} tokens, "
                        f"delivered {self.received}",
                    )
                self.state = ClientState.CLOSED
                return JobDone(usage)
            text, n, total = check_tokens_body(body)
        if total != self.received + n or total > self.max_tokens:
            raise RemoteProtocolError(
                "schema", f"token count jumped from {self.received} to {total}"
            )
        text_bytes = self.text_bytes + len(text.encode())
        # Every billed token shows at least one byte of text (tokens that never do are
        # not sent as chunks), so a provider cannot bill "ok" as 4000 tokens.
        if n < 1 or not text or total > text_bytes + TOKEN_COUNT_SLACK:
            raise RemoteProtocolError(
                "schema", f"provider claims {total} tokens for {text_bytes} bytes of text"
            )
        self.text_bytes = text_bytes
        self.received = total
        return TokensReceived(text, n, total)

    def voucher(self, boc: bytes) -> VoucherMsg:
        """The answer to the last PaymentRequested."""
        if self.state is not ClientState.OWES_VOUCHER:
            raise LocalProtocolError(f"voucher in state {self.state.value}")
        self.state = ClientState.STREAMING
        self.owed = None
        return VoucherMsg(boc=boc)

    def abort(self, code: str, msg: str) -> ErrorMsg:
        """The client gives up on the job (allowed in any state)."""
        self.state = ClientState.CLOSED
        return ErrorMsg(code=code, msg=msg)


# Stall detection ---------------------------------------------------------------------

# A provider waits this long for the Open on a new job stream, then closes it: a client
# sends Open as soon as its stream is open, or, for a spare stream opened ahead of its
# next job (core.spare_streams), well within this.
OPEN_TIMEOUT_S = 10.0

# Between tokens: a queued job waits for a slot, and a CPU provider decodes a long prompt
# before its first token; no wait on one provider is allowed past two minutes.
TOKEN_TIMEOUT_S = 120.0
# First token: a queued job waits for a slot (about one job's time on a sane provider)
# before prefill starts, so even a short prompt gets half a minute.
FIRST_TOKEN_FLOOR_S = 30.0
# ...plus prefill at no slower than 50 prompt tokens/s, about a small model on one weak
# CPU core; a prompt of 4,500 tokens reaches the 120 s cap.
PREFILL_S_PER_TOKEN = 0.02
# Rough bytes per prompt token for that bound (English averages about four).
PROMPT_BYTES_PER_TOKEN = 4
# Mid-stream, a gap this much longer than the provider's own average gap is a stall: a
# decoder's pace varies by a few times (a batch neighbour's prefill, a voucher's fsync),
# not by twenty.
STALL_GAP_FACTOR = 20.0
# ...but never less than this: scheduler hiccups, a GC pause, a voucher fsync on a slow
# disk and a neighbour job's chunked prefill all fit in five seconds.
STALL_FLOOR_S = 5.0
# The average gap follows the last ~5 token frames: quick to learn a provider's pace.
GAP_EWMA_ALPHA = 0.2


class StallDetector:
    """How long a client waits for a provider's next frame, from that provider's own pace.

    Before the first token: `FIRST_TOKEN_FLOOR_S + prompt tokens x PREFILL_S_PER_TOKEN`.
    After it: `max(STALL_FLOOR_S, STALL_GAP_FACTOR x EWMA of the gaps between token
    frames)`. Both are capped at `TOKEN_TIMEOUT_S`. A provider that stops sending
    mid-stream is thus given up on within max(5 s, 20 x its usual gap), at most 120 s;
    for any provider faster than 4 token frames/s that is 5 s. Time is the caller's: it
    passes how long each wait took.
    """

    def __init__(self, prompt_tokens: int) -> None:
        self.first_token_s = min(
            TOKEN_TIMEOUT_S, FIRST_TOKEN_FLOOR_S + prompt_tokens * PREFILL_S_PER_TOKEN
        )
        self.gap_s: float | None = None  # EWMA of waits that ended in a token frame

    @classmethod
    def for_prompt(cls, prompt: str) -> StallDetector:
        return cls(len(prompt.encode()) // PROMPT_BYTES_PER_TOKEN)

    def timeout(self) -> float:
        """The longest wait for the next frame before the provider counts as stalled."""
        if self.gap_s is None:
            return self.first_token_s
        return min(TOKEN_TIMEOUT_S, max(STALL_FLOOR_S, STALL_GAP_FACTOR * self.gap_s))

    def token_frame(self, waited_s: float, *, first: bool) -> None:
        """A token frame arrived after `waited_s`; the first one's wait (queue, prefill)
        says nothing about the decoding pace."""
        if first:
            self.gap_s = self.gap_s if self.gap_s is not None else 0.0
            return
        old = self.gap_s
        self.gap_s = waited_s if not old else old + GAP_EWMA_ALPHA * (waited_s - old)
