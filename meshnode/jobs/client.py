"""Client half of `/meshnode/job/1`: seal a prompt to the provider's job key, stream
the tokens back, pay when asked, and check the provider's accounting on the way."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from nacl.public import PrivateKey

from meshnode.core.crypto import Opener, Sealer, client_session
from meshnode.core.errors import EXIT_JOB_FAILED, MeshnodeError
from meshnode.core.messages import (
    JOB_ID_BYTES,
    JOB_PROTOCOL,
    Accept,
    Busy,
    ErrorMsg,
    NeedPayment,
    Open,
    SchemaError,
    Sealed,
    Usage,
    VoucherMsg,
    check_done_body,
    check_tokens_body,
)
from meshnode.jobs.payment_gate import NoPayer, Payer
from meshnode.p2p.framed import FramedStream, StreamClosed

# Opening a stream to a connected peer is one round trip; 10 s means the peer is gone.
STREAM_OPEN_TIMEOUT_S = 10.0
# Accept or Busy follows the prompt within a round trip unless the provider is stuck.
ACCEPT_TIMEOUT_S = 15.0
# Between tokens: a queued job waits for a slot, and a CPU provider decodes a long
# prompt before its first token; two minutes covers both without hanging forever.
TOKEN_TIMEOUT_S = 120.0

# Tokens billed beyond the text's byte count: none in practice; a little room for a
# tokenizer that maps a token to an empty piece now and then.
TOKEN_COUNT_SLACK = 8

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
    payer = payer or NoPayer()
    start = time.perf_counter()
    with trio.fail_after(STREAM_OPEN_TIMEOUT_S):
        stream = await host.new_stream(peer, [TProtocol(JOB_PROTOCOL)])
    fs = FramedStream(stream)
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
    except Exception as exc:  # WireError, SealError: the provider broke the protocol
        raise _failed(getattr(exc, "code", "protocol"), str(exc), received[0]) from exc
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
    job_id = os.urandom(JOB_ID_BYTES)
    ephemeral = PrivateKey.generate()
    keys = client_session(ephemeral, provider_job_pub)
    sealer = Sealer(keys.send, ad=job_id)
    client_pub = bytes(ephemeral.public_key)
    channel_id = req.channel_id if req.channel_id is not None else payer.channel_id
    payer.begin(req.prompt)
    # Naming a channel takes its key's proof, bound to this job and this provider.
    auth = None if channel_id is None else payer.authorize(job_id, client_pub, peer.to_base58())
    await fs.send(
        Open(
            job_id=job_id,
            model_id=req.model_id,
            params=req.params,
            max_tokens=req.max_tokens,
            channel_id=channel_id,
            client_pub=client_pub,
            header=sealer.header,
            auth=auth,
            channel_key=None if channel_id is None else payer.channel_key(),
        )
    )
    await fs.send(Sealed(sealer.seal({"k": "prompt", "prompt": req.prompt})))
    sent_at = time.perf_counter()

    reply = await fs.recv(ACCEPT_TIMEOUT_S)
    if isinstance(reply, Busy):
        raise ProviderBusy(reply.retry_after)
    if isinstance(reply, ErrorMsg):
        raise JobError(reply.code, reply.msg, before_first_token=True)
    if not isinstance(reply, Accept):
        raise SchemaError(f"expected accept, got {type(reply).__name__}")
    opener = Opener(keys.recv, reply.header, ad=job_id)
    accept_s = time.perf_counter() - sent_at
    payer.accepted(reply.prompt_tokens, reply.owed_before)

    received = 0
    text_bytes = 0
    ttft = 0.0
    while True:
        msg = await fs.recv(TOKEN_TIMEOUT_S)
        if isinstance(msg, Sealed):
            body, final = opener.open(msg.ciphertext)
            if final:
                usage = check_done_body(body)
                if usage.completion_tokens != received:
                    raise SchemaError(
                        f"provider billed {usage.completion_tokens} tokens, delivered {received}"
                    )
                payer.check_usage(usage)
                return JobResult(
                    text="".join(text),
                    usage=usage,
                    ttft_s=ttft,
                    elapsed_s=time.perf_counter() - start,
                    provider=str(peer),
                    accept_s=accept_s,
                )
            chunk, n, total = check_tokens_body(body)
            if total != received + n or total > req.max_tokens:
                raise SchemaError(f"token count jumped from {received} to {total}")
            text_bytes += len(chunk.encode())
            # Every billed token shows at least one byte of text (tokens that never do are
            # not sent as chunks), so a provider cannot bill "ok" as 4000 tokens.
            if n < 1 or not chunk or total > text_bytes + TOKEN_COUNT_SLACK:
                raise SchemaError(
                    f"provider claims {total} tokens for {text_bytes} bytes of text"
                )
            received = counted[0] = total
            if not text:
                ttft = time.perf_counter() - start
            text.append(chunk)
            if on_text is not None:
                await on_text(chunk)
        elif isinstance(msg, NeedPayment):
            if msg.delivered != received:
                raise SchemaError(f"provider claims {msg.delivered} delivered, saw {received}")
            await fs.send(VoucherMsg(boc=await payer.voucher_for(msg.owed, received)))
        elif isinstance(msg, ErrorMsg):
            raise JobError(msg.code, msg.msg, before_first_token=received == 0)
        else:
            raise SchemaError(f"unexpected {type(msg).__name__} from provider")
