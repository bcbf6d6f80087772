"""Client half of `/meshnode/job/1`: seal a prompt to the provider's job key, stream
the tokens back, pay when asked, and check the provider's accounting on the way.

A trio driver over `core.job_protocol.ClientJob` (the ordering and accounting rules)
and `StallDetector` (how long to wait for the provider's next frame)."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
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
from meshnode.core.messages import JOB_ID_BYTES, JOB_PROTOCOL, Usage
from meshnode.core.wire import WireError
from meshnode.jobs.payment_gate import NoPayer, Payer, PaymentRejected
from meshnode.p2p.framed import FramedStream, StreamClosed
from meshnode.p2p.stream_open import open_stream

# Opening a stream to a connected peer is one round trip; 10 s means the peer is gone.
STREAM_OPEN_TIMEOUT_S = 10.0
# Accept or Busy follows the prompt within a round trip unless the provider is stuck.
ACCEPT_TIMEOUT_S = 15.0
# Between tokens the wait follows the provider's own pace: core.job_protocol.StallDetector
# (at most TOKEN_TIMEOUT_S, re-exported here with TOKEN_COUNT_SLACK for callers).
__all__ = ["TOKEN_COUNT_SLACK", "TOKEN_TIMEOUT_S", "JobError", "JobRequest", "JobResult",
           "ProviderBusy", "run_job", "run_job_on_stream"]

OnText = Callable[[str], Awaitable[None]]


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
) -> JobResult:
    if request.max_tokens < 1:  # every provider refuses it (schema): never send it
        raise ValueError(f"a job must ask for at least 1 token, got {request.max_tokens}")
    start = time.perf_counter()
    stream = await open_stream(host, peer, JOB_PROTOCOL, STREAM_OPEN_TIMEOUT_S)
    return await run_job_on_stream(
        FramedStream(stream), peer, provider_job_pub, request, on_text=on_text,
        payer=payer, start=start,
    )


async def run_job_on_stream(
    fs: FramedStream,
    peer: ID,
    provider_job_pub: bytes,
    request: JobRequest,
    *,
    on_text: OnText | None = None,
    payer: Payer | None = None,
    start: float | None = None,
) -> JobResult:
    """`run_job` on a job stream that is already open; closes (or resets) it."""
    payer = payer or NoPayer()
    start = time.perf_counter() if start is None else start
    text: list[str] = []
    received = [0]
    done = False
    try:
        result = await _exchange(
            fs, peer, provider_job_pub, request, on_text, payer, start, text, received
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
        await (fs.close() if done else fs.reset())


def _failed(code: str, msg: str, received: int) -> JobError:
    return JobError(code, msg, before_first_token=received == 0, received_tokens=received)


async def _exchange(
    fs: FramedStream,
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
    for frame in job.open(channel_id, auth,
                          None if channel_id is None else payer.channel_key()):
        await fs.send(frame)
    sent_at = time.perf_counter()

    event = job.receive_frame(await fs.recv(ACCEPT_TIMEOUT_S))
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
