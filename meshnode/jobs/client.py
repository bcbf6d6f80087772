"""Client half of `/meshnode/job/1`: seal a prompt to the provider's job key, stream
the tokens back, pay when asked, and check the provider's accounting on the way.

A trio driver over `core.job_protocol.ClientJob` (the ordering and accounting rules)
and `StallDetector` (how long to wait for the provider's next frame)."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from meshnode.core.errors import EXIT_JOB_FAILED, MeshnodeError
from meshnode.core.job_protocol import (
    TOKEN_COUNT_SLACK,
    TOKEN_TIMEOUT_S,
    Accepted,
    ClientJob,
    JobDone,
    LocalProtocolError,
    PaymentRequested,
    ProtocolError,
    ProviderFailed,
    StallDetector,
    TokensReceived,
)
from meshnode.core.job_protocol import ProviderBusy as BusyEvent
from meshnode.core.messages import JOB_ID_BYTES, JOB_PROTOCOL, ErrorMsg, Message, Usage
from meshnode.core.wire import WireError
from meshnode.jobs.job_streams import STREAM_OPEN_TIMEOUT_S, JobStreams
from meshnode.jobs.payment_gate import NoPayer, Payer, PaymentRejected
from meshnode.p2p.framed import FramedStream, StreamClosed
from meshnode.p2p.stream_open import open_stream

log = logging.getLogger(__name__)

# Accept or Busy follows the prompt within a round trip unless the provider is stuck.
ACCEPT_TIMEOUT_S = 15.0
# Between tokens the wait follows the provider's own pace: core.job_protocol.StallDetector
# (at most TOKEN_TIMEOUT_S, re-exported here with TOKEN_COUNT_SLACK for callers).
__all__ = ["STREAM_OPEN_TIMEOUT_S", "TOKEN_COUNT_SLACK", "TOKEN_TIMEOUT_S", "JobError",
           "JobRequest", "JobResult", "ProviderBusy", "run_job", "run_job_on_stream"]

OnText = Callable[[str], Awaitable[None]]
Reopen = Callable[[], Awaitable[INetStream]]
# The provider's answer on a spare stream it had given up on (its Open timeout): it never
# saw this job, so the job's first frames go again on a fresh stream.
SPARE_GAVE_UP_CODE = "timeout"


class JobError(MeshnodeError):
    """The job did not complete; `code` is stable, `before_first_token` tells retry logic
    whether another provider may simply start over."""

    exit_code = EXIT_JOB_FAILED
    label = "job failed"

    def __init__(
        self, code: str, msg: str, *, before_first_token: bool, received_tokens: int = 0
    ) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.before_first_token = before_first_token
        # Completion tokens this provider delivered before failing (failover continues
        # from them and pays for them).
        self.received_tokens = received_tokens


class ProviderBusy(JobError):
    def __init__(self, retry_after: float) -> None:
        super().__init__("busy", f"retry after {retry_after:.1f}s", before_first_token=True)
        self.retry_after = retry_after


@dataclass(frozen=True)
class JobRequest:
    model_id: str
    prompt: str
    max_tokens: int
    params: dict[str, Any]
    channel_id: int | None = None


@dataclass(frozen=True)
class JobResult:
    text: str
    usage: Usage
    ttft_s: float
    elapsed_s: float
    provider: str
    # Open sent → Accept received: one round trip plus the provider's admission work,
    # the router's latency sample for this peer.
    accept_s: float = 0.0


async def run_job(
    host: IHost,
    peer: ID,
    provider_job_pub: bytes,
    request: JobRequest,
    *,
    on_text: OnText | None = None,
    payer: Payer | None = None,
    streams: JobStreams | None = None,
) -> JobResult:
    """One job on `peer`. With `streams`, it starts on the peer's spare stream when one
    is fresh (no stream open before Open), and leaves a spare behind when it succeeds."""
    if request.max_tokens < 1:  # every provider refuses it (schema): never send it
        raise ValueError(f"a job must ask for at least 1 token, got {request.max_tokens}")
    start = time.perf_counter()
    reopen: Reopen | None = None
    if streams is None:
        stream = await open_stream(host, peer, JOB_PROTOCOL, STREAM_OPEN_TIMEOUT_S)
    else:
        stream, spare = await streams.stream_for(peer)
        if spare:
            reopen = functools.partial(streams.fresh, peer)
    try:
        result = await run_job_on_stream(
            FramedStream(stream), peer, provider_job_pub, request, on_text=on_text,
            payer=payer, start=start, reopen=reopen,
        )
    except JobError:
        if streams is not None:
            streams.forget(peer)
        raise
    if streams is not None:
        streams.job_ended(peer)
    return result


async def run_job_on_stream(
    fs: FramedStream,
    peer: ID,
    provider_job_pub: bytes,
    request: JobRequest,
    *,
    on_text: OnText | None = None,
    payer: Payer | None = None,
    start: float | None = None,
    reopen: Reopen | None = None,
) -> JobResult:
    """`run_job` on a job stream that is already open; closes (or resets) it. With
    `reopen` (the stream is a spare, opened before this job), a stream the provider
    dropped before answering is replaced once by `reopen()`'s and the first frames
    sent again."""
    payer = payer or NoPayer()
    start = time.perf_counter() if start is None else start
    text: list[str] = []
    received = [0]
    done = False
    conn = _Conn(fs, reopen)
    try:
        result = await _exchange(
            conn, peer, provider_job_pub, request, on_text, payer, start, text, received
        )
        done = True
        with trio.CancelScope(shield=True):
            await payer.finish(received[0], complete=True)
        return result
    except StreamClosed as exc:
        raise _failed("disconnected", str(exc), received[0]) from exc
    except trio.TooSlowError as exc:
        raise _failed("timeout", "provider stopped answering", received[0]) from exc
    except JobError as exc:
        exc.received_tokens = received[0]
        raise
    except LocalProtocolError:  # a bug here, not the provider's doing
        raise
    except (WireError, ProtocolError, PaymentRejected) as exc:  # the provider broke the
        # protocol, or its bill or payment request is one this client cannot agree to
        raise _failed(exc.code, str(exc), received[0]) from exc
    finally:
        if not done:
            # What was received is owed (and paid by a later voucher): on record first.
            with trio.CancelScope(shield=True):
                await payer.finish(received[0], complete=False)
        # A job abandoned midway (cancelled, failed) resets the stream so the provider
        # stops generating at once instead of filling buffers nobody reads.
        await (conn.fs.close() if done else conn.fs.reset())


class _Conn:
    """The job's stream, which a dead spare's replacement takes over."""

    def __init__(self, fs: FramedStream, reopen: Reopen | None) -> None:
        self.fs = fs
        self.reopen = reopen

    async def first_reply(self, frames: list[Message]) -> Message:
        """Send the job's first frames in one write and read the provider's answer. On a
        spare the provider dropped (reset, closed, or its Open timeout's Error) before
        answering, it never saw the job: the same frames go once more on a fresh stream."""
        if self.reopen is not None:
            try:
                await self.fs.send_many(frames)
                reply = await self.fs.recv(ACCEPT_TIMEOUT_S)
            except StreamClosed:
                pass
            else:
                if not (isinstance(reply, ErrorMsg) and reply.code == SPARE_GAVE_UP_CODE):
                    return reply
            log.debug("the spare job stream was dead; sending on a fresh one")
            await self.fs.reset()
            reopen, self.reopen = self.reopen, None
            self.fs = FramedStream(await reopen())
        await self.fs.send_many(frames)
        return await self.fs.recv(ACCEPT_TIMEOUT_S)


def _failed(code: str, msg: str, received: int) -> JobError:
    return JobError(code, msg, before_first_token=received == 0, received_tokens=received)


async def _exchange(
    conn: _Conn,
    peer: ID,
    provider_job_pub: bytes,
    req: JobRequest,
    on_text: OnText | None,
    payer: Payer,
    start: float,
    text: list[str],
    counted: list[int],
) -> JobResult:
    job = ClientJob(provider_job_pub, req.model_id, req.prompt, req.max_tokens, req.params,
                    job_id=os.urandom(JOB_ID_BYTES))
    channel_id = req.channel_id if req.channel_id is not None else payer.channel_id
    payer.begin(req.prompt)
    # Naming a channel takes its key's proof, bound to this job and this provider.
    auth = (None if channel_id is None
            else payer.authorize(job.job_id, job.client_pub, peer.to_base58()))
    sent_at = time.perf_counter()
    first = await conn.first_reply(
        job.open(channel_id, auth, None if channel_id is None else payer.channel_key()))
    fs = conn.fs
    event = job.receive_frame(first)
    if isinstance(event, BusyEvent):
        raise ProviderBusy(event.retry_after)
    if isinstance(event, ProviderFailed):
        raise JobError(event.code, event.msg, before_first_token=True)
    assert isinstance(event, Accepted)
    accept_s = time.perf_counter() - sent_at
    payer.accepted(event.prompt_tokens, event.owed_before)

    stall = StallDetector.for_prompt(req.prompt)
    ttft = 0.0
    while True:
        waited_from = trio.current_time()
        try:
            msg = await fs.recv(stall.timeout())
        except trio.TooSlowError:
            raise JobError(
                "stalled",
                f"provider sent nothing for {stall.timeout():.1f} s "
                f"(its pace: {stall.gap_s if stall.gap_s is not None else 0:.3f} s a frame)",
                before_first_token=job.received == 0,
                received_tokens=job.received,
            ) from None
        event = job.receive_frame(msg)
        if isinstance(event, TokensReceived):
            stall.token_frame(trio.current_time() - waited_from, first=not text)
            counted[0] = event.total
            if not text:
                ttft = time.perf_counter() - start
            text.append(event.text)
            if on_text is not None:
                await on_text(event.text)
        elif isinstance(event, PaymentRequested):
            await fs.send(job.voucher(await payer.voucher_for(event.owed, event.delivered)))
        elif isinstance(event, JobDone):
            payer.check_usage(event.usage)
            return JobResult(
                text="".join(text),
                usage=event.usage,
                ttft_s=ttft,
                elapsed_s=time.perf_counter() - start,
                provider=str(peer),
                accept_s=accept_s,
            )
        else:
            assert isinstance(event, ProviderFailed)
            raise JobError(event.code, event.msg, before_first_token=job.received == 0)
