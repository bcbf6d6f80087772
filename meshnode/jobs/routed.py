"""Run a job on the best provider for a model, failing over when a provider fails.

Before the first token a failure simply moves on to the next candidate. After it, the
job continues on another provider from the text already delivered (prompt + partial
output, with the remaining token budget), so the caller sees one continuous answer:
every piece of text is shown exactly once, in order. Each provider is paid by its own
payer for exactly the tokens it delivered (`JobPayments`: a channel per priced provider,
opened on first use within the client's budget; providers it cannot afford are skipped).
A retry budget and an overall deadline bound it all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID

from meshnode.core.advert import Advert
from meshnode.core.directory import Directory, Provider
from meshnode.core.errors import EXIT_NO_PROVIDER, MeshnodeError
from meshnode.core.messages import Usage
from meshnode.core.router import Candidate, JobEstimate, Router
from meshnode.jobs.client import JobError, JobRequest, OnText, ProviderBusy, run_job
from meshnode.jobs.job_streams import JobStreams
from meshnode.jobs.payment_gate import JobPayments, PaymentUnavailable, PayNothing

log = logging.getLogger(__name__)

# Four providers failing one job in a row means the mesh (or the request) is the problem.
DEFAULT_MAX_ATTEMPTS = 4
# Long CPU generations take minutes; beyond ten the user has given up anyway.
DEFAULT_DEADLINE_S = 600.0
# Errors that are the request's fault: every provider would refuse it the same way.
NON_RETRYABLE = frozenset({"bad_params", "bad_request", "prompt_too_long", "overbilled"})
# Failures before the first token that say the provider cannot be reached (rather than
# that it refused this job): the router skips it for a while (Router.record_unreachable).
UNREACHABLE_CODES = frozenset({"disconnected", "timeout", "stalled"})
# Rough characters per token, only for the router's estimate before any tokenizer runs.
CHARS_PER_TOKEN = 4
# When every provider is busy, wait for the soonest free place if it is this close;
# further out, answer "busy, retry after" and let the caller decide (an HTTP client
# gets 503 with Retry-After).
MAX_BUSY_WAIT_S = 10.0


class ProvidersBusy(Exception):
    """Every provider of the model is busy right now; ``retry_after`` is the soonest any
    of them expects a free place. Not "no provider": trying again later will work."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoProvider(MeshnodeError):
    """No eligible provider (none known, none verified, or all of them failed)."""

    exit_code = EXIT_NO_PROVIDER
    label = "no provider"

    def __init__(self, msg: str, *, attempts: list[str] | None = None) -> None:
        super().__init__(msg)
        self.attempts = attempts or []


@dataclass(frozen=True)
class Segment:
    provider: str
    completion_tokens: int
    cost_nanoton: int
    error: str | None = None  # why this provider stopped early, if it did
    chars: int = 0  # characters of the answer this provider delivered


@dataclass
class RoutedResult:
    text: str
    usage: Usage
    ttft_s: float
    elapsed_s: float
    segments: list[Segment] = field(default_factory=list)

    @property
    def providers(self) -> list[str]:
        return [s.provider for s in self.segments]


Dialer = Callable[[Advert], Awaitable[None]]


def pick_model_id(providers: list[Provider]) -> str:
    """A model named by name may map to several files; take the most widely served."""
    counts: dict[str, int] = {}
    for p in providers:
        counts[p.offer.id] = counts.get(p.offer.id, 0) + 1
    return max(sorted(counts), key=lambda k: counts[k])


@dataclass
class RoutedJobs:
    host: IHost
    directory: Directory
    router: Router
    dial: Dialer
    payments: JobPayments = field(default_factory=PayNothing)
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    deadline_s: float = DEFAULT_DEADLINE_S
    clock: Callable[[], float] = time.time
    on_settled: Callable[[], Awaitable[None]] | None = None
    streams: JobStreams | None = None  # spare job streams (node.ClientNode's)

    async def complete(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int,
        params: dict[str, Any],
        on_text: OnText | None = None,
    ) -> RoutedResult:
        if max_tokens < 1:  # a provider refuses an Open for nothing (schema)
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        start = time.perf_counter()
        pieces: list[str] = []
        delivered = 0
        segments: list[Segment] = []
        tried: set[str] = set()
        busy_until: dict[str, float] = {}  # peer -> when it expects a free place
        ttft = 0.0

        seg_chars = 0

        async def show(text: str) -> None:
            nonlocal ttft, seg_chars
            if not pieces:
                ttft = time.perf_counter() - start
            pieces.append(text)
            seg_chars += len(text)
            if on_text is not None:
                await on_text(text)

        with trio.fail_after(self.deadline_s):
            while True:
                now = self.clock()
                providers = self.directory.providers_for(model, now)
                if not providers:
                    raise NoProvider(f"no provider known for model {model!r}")
                # Pick the file among providers the router may use, so unverified peers
                # advertising a made-up id under a popular name cannot outvote real ones.
                usable = [p for p in providers
                          if p.listing.verified or self.router.allow_unverified]
                model_id = pick_model_id(usable or providers)
                by_peer = {p.peer_id: p for p in providers if p.offer.id == model_id}
                for p in by_peer.values():
                    self.router.note_advert(p.peer_id, p.advert.seq)
                estimate = JobEstimate(
                    model_id=model_id,
                    prompt_tokens=len(prompt) // CHARS_PER_TOKEN + delivered,
                    completion_tokens=max_tokens - delivered,
                )
                fresh = [Candidate.from_provider(p) for p in by_peer.values()
                         if p.peer_id not in tried and self.payments.affordable(
                             p.advert, model_id, prompt, max_tokens - delivered)]
                order = self.router.choose(fresh, estimate, now)
                if not order and busy_until:
                    # Everyone left is only busy: wait for the first free place, or say
                    # when to come back. Busy answers do not count as failed attempts.
                    wait = max(0.0, min(busy_until.values()) - time.monotonic())
                    if wait > MAX_BUSY_WAIT_S:
                        raise ProvidersBusy(
                            f"all {len(by_peer)} provider(s) of {model!r} are busy; the "
                            f"first expects a free place in {wait:.1f} s", retry_after=wait)
                    await trio.sleep(wait)
                    tried -= set(busy_until)
                    busy_until.clear()
                    continue
                if not order or len(tried - set(busy_until)) >= self.max_attempts:
                    raise NoProvider(
                        f"no eligible provider left for {model!r} after {len(tried)} "
                        f"attempt(s) ({len(by_peer)} known, verified: "
                        f"{sum(p.listing.verified for p in by_peer.values())}, affordable: "
                        f"{len(fresh)})",
                        attempts=[s.provider for s in segments],
                    )
                choice = by_peer[order[0].peer_id]
                tried.add(choice.peer_id)
                log.debug("job for %s: attempt %d on %s (%d candidate(s))", model_id[:12],
                          len(tried), choice.peer_id, len(order))
                request = JobRequest(
                    model_id=model_id,
                    prompt=prompt + "".join(pieces),
                    max_tokens=max_tokens - delivered,
                    params=params,
                )
                self.router.record_start(choice.peer_id, now)
                seg_chars = 0
                t0 = time.perf_counter()
                charged = [0]
                try:
                    await self.dial(choice.advert)
                    async with self.payments.job(
                        choice.advert, model_id, request.prompt, request.max_tokens
                    ) as payer:
                        try:
                            res = await run_job(
                                self.host,
                                ID.from_base58(choice.peer_id),
                                choice.advert.job_pubkey,
                                request,
                                on_text=show,
                                payer=payer,
                                streams=self.streams,
                            )
                        finally:
                            charged[0] = payer.charged if payer is not None else 0
                except ProviderBusy as exc:
                    self.router.record_abandoned(choice.peer_id, self.clock())
                    busy_until[choice.peer_id] = time.monotonic() + exc.retry_after
                    segments.append(Segment(choice.peer_id, 0, 0, error="busy"))
                    log.info("provider %s busy (retry after %.1f s)", choice.peer_id,
                             exc.retry_after)
                    continue
                except PaymentUnavailable as exc:  # says nothing about the provider
                    self.router.record_abandoned(choice.peer_id, self.clock())
                    segments.append(Segment(choice.peer_id, 0, 0, error=exc.code))
                    log.info("cannot pay %s (%s); trying another provider", choice.peer_id, exc)
                    continue
                except (JobError, OSError, trio.TooSlowError) as exc:
                    if isinstance(exc, JobError) and exc.code in NON_RETRYABLE:
                        self.router.record_abandoned(choice.peer_id, self.clock())
                        raise
                    got = exc.received_tokens if isinstance(exc, JobError) else 0
                    code = exc.code if isinstance(exc, JobError) else type(exc).__name__
                    if got == 0 and (not isinstance(exc, JobError) or code in UNREACHABLE_CODES):
                        self.router.record_unreachable(choice.peer_id, self.clock())
                    else:
                        self.router.record_failure(choice.peer_id, self.clock())
                    delivered += got
                    segments.append(Segment(choice.peer_id, got, charged[0], error=code,
                                            chars=seg_chars))
                    if delivered >= max_tokens:
                        # Cut after the last token but before Done: the answer is whole
                        # and there is nothing left to generate (an Open for 0 tokens
                        # would be refused everywhere), so the job has succeeded.
                        log.info("provider %s failed (%s) after the last token; the "
                                 "answer is complete", choice.peer_id, code)
                        return self._result(prompt, pieces, delivered, "length", segments,
                                            ttft, start)
                    log.info("provider %s failed (%s) after %d tokens; failing over",
                             choice.peer_id, code, got)
                    continue
                except Exception as exc:  # a dial error from libp2p: try the next one
                    self.router.record_unreachable(choice.peer_id, self.clock())
                    segments.append(Segment(choice.peer_id, 0, 0, error=type(exc).__name__))
                    log.info("cannot reach %s (%s); failing over", choice.peer_id, exc)
                    continue
                self.router.record_success(
                    choice.peer_id,
                    self.clock(),
                    duration_s=time.perf_counter() - t0,
                    completion_tokens=res.usage.completion_tokens,
                    first_token_s=res.ttft_s if res.usage.completion_tokens else None,
                    rtt_sample_s=res.accept_s,
                )
                earlier = delivered
                delivered += res.usage.completion_tokens
                segments.append(
                    Segment(choice.peer_id, res.usage.completion_tokens,
                            charged[0] if charged[0] else res.usage.cost_nanoton,
                            chars=seg_chars)
                )
                if self.on_settled is not None:
                    await self.on_settled()
                return RoutedResult(
                    text="".join(pieces),
                    usage=Usage(
                        # After a failover the last provider's prompt includes the text
                        # delivered earlier; subtract it to report the user's prompt.
                        prompt_tokens=max(0, res.usage.prompt_tokens - earlier),
                        completion_tokens=delivered,
                        finish_reason=res.usage.finish_reason,
                        cost_nanoton=sum(s.cost_nanoton for s in segments),
                    ),
                    ttft_s=ttft,
                    elapsed_s=time.perf_counter() - start,
                    segments=segments,
                )

    @staticmethod
    def _result(
        prompt: str,
        pieces: list[str],
        delivered: int,
        finish_reason: str,
        segments: list[Segment],
        ttft: float,
        start: float,
    ) -> RoutedResult:
        """The result of a job whose last provider sent no Done: usage from what was
        received (the prompt's size is the client's estimate, no provider reported it)."""
        return RoutedResult(
            text="".join(pieces),
            usage=Usage(
                prompt_tokens=len(prompt) // CHARS_PER_TOKEN,
                completion_tokens=delivered,
                finish_reason=finish_reason,
                cost_nanoton=sum(s.cost_nanoton for s in segments),
            ),
            ttft_s=ttft,
            elapsed_s=time.perf_counter() - start,
            segments=segments,
        )
