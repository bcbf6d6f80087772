"""What the HTTP endpoint needs from the mesh: a model list and one completion at a time.

``CompletionBackend`` is the seam between the OpenAI-compatible layer and the client
node. ``RoutedBackend`` picks the best verified provider per job and fails over
(``ClientNode.complete``); ``SingleProviderBackend`` pins every job to one connected
provider. Failures are ``BackendError``s that carry the HTTP status to answer with.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from meshnode.api.chat_format import CHAT_FORMATS, guess_chat_format
from meshnode.core.advert import Advert
from meshnode.core.directory import ModelSummary
from meshnode.jobs.client import JobError
from meshnode.jobs.routed import NoProvider, ProvidersBusy

if TYPE_CHECKING:
    from meshnode.node import ClientNode

OnText = Callable[[str], Awaitable[None]]

# Stable error codes (``BackendError.code``) and the HTTP status each maps to.
MODEL_NOT_FOUND = "model_not_found"
MODEL_AMBIGUOUS = "model_ambiguous"
BAD_PARAMS = "bad_params"
NO_PROVIDER = "no_provider"
PROVIDER_BUSY = "provider_busy"
PROVIDER_TIMEOUT = "provider_timeout"
PROVIDER_FAILED = "provider_failed"

STATUS_BY_CODE: Mapping[str, int] = {
    MODEL_NOT_FOUND: 404,
    MODEL_AMBIGUOUS: 400,
    BAD_PARAMS: 400,
    NO_PROVIDER: 503,
    PROVIDER_BUSY: 503,
    PROVIDER_TIMEOUT: 504,
    PROVIDER_FAILED: 502,
}

# How provider-side job error codes (``JobError.code``) read to an HTTP client.
_BACKEND_CODE_BY_JOB_CODE: Mapping[str, str] = {
    "unknown_model": MODEL_NOT_FOUND,
    "bad_params": BAD_PARAMS,
    "bad_request": BAD_PARAMS,
    "prompt_too_long": BAD_PARAMS,
    "busy": PROVIDER_BUSY,
    "timeout": PROVIDER_TIMEOUT,
    "stalled": PROVIDER_TIMEOUT,  # the provider stopped sending (core.job_protocol)
}


class BackendError(Exception):
    """A completion that cannot be served; ``code`` is stable, ``http_status`` is what
    the endpoint answers with."""

    def __init__(self, code: str, message: str, http_status: int | None = None, *,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status or STATUS_BY_CODE.get(code, 502)
        self.retry_after = retry_after


def backend_error_from_job(exc: JobError) -> BackendError:
    """Translate a failed job: the caller's mistakes stay 4xx, the mesh's become 5xx."""
    code = _BACKEND_CODE_BY_JOB_CODE.get(exc.code, PROVIDER_FAILED)
    return BackendError(code, str(exc))


@dataclass(frozen=True)
class ModelCard:
    """One model on offer, as the HTTP layer lists and resolves it."""

    id: str  # sha256 hex of the GGUF: unique, and what providers are asked for
    name: str
    quant: str
    ctx: int  # smallest context window among its providers
    providers: int
    verified_providers: int
    price_prompt_per_1k: int  # nanoton, cheapest provider
    price_completion_per_1k: int  # nanoton, cheapest provider
    chat_format: str  # a key of chat_format.CHAT_FORMATS
    owned_by: str = "meshnode"

    @classmethod
    def from_summary(cls, summary: ModelSummary, chat_format: str | None = None) -> ModelCard:
        return cls(
            id=summary.id,
            name=summary.name,
            quant=summary.quant,
            ctx=summary.ctx,
            providers=summary.providers,
            verified_providers=summary.verified_providers,
            price_prompt_per_1k=summary.min_price_prompt_per_1k,
            price_completion_per_1k=summary.min_price_completion_per_1k,
            chat_format=chat_format
            or _known(summary.chat_format)
            or guess_chat_format(summary.name),
        )


@dataclass(frozen=True)
class CompletionRequest:
    model: str  # ModelCard.id
    prompt: str  # already rendered for chat requests
    max_tokens: int
    # Validated sampling parameters (``SamplingParams.from_dict`` keys); only those the
    # HTTP client set, so providers apply their model's defaults for the rest.
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CompletionResult:
    text: str
    finish_reason: str  # as the provider reported it: stop, length, cancelled, unpaid
    prompt_tokens: int
    completion_tokens: int
    cost_nanoton: int
    provider: str  # peer id of the provider that produced the text (the last, on failover)
    insecure: bool  # the provider ran without a verified TEE


class CompletionBackend(Protocol):
    def list_models(self) -> list[ModelCard]:
        """Models that can be served now."""
        ...

    async def complete(self, req: CompletionRequest, on_text: OnText | None) -> CompletionResult:
        """Run one completion, calling ``on_text`` with each new piece of text in order.
        Cancelling the caller must stop the job on the provider. Raises BackendError."""
        ...


def resolve_model(cards: Sequence[ModelCard], requested: str) -> ModelCard:
    """The card a request's ``model`` names: by id, else by a name only one card has."""
    for card in cards:
        if card.id == requested:
            return card
    named = [card for card in cards if card.name == requested]
    if len(named) == 1:
        return named[0]
    if named:
        ids = ", ".join(card.id for card in named)
        raise BackendError(
            MODEL_AMBIGUOUS, f"several models are called {requested!r}; use an id: {ids}"
        )
    raise BackendError(
        MODEL_NOT_FOUND, f"the model {requested!r} does not exist or no provider serves it"
    )


def _advert_cards(
    advert: Advert, chat_formats: Mapping[str, str], verified: bool
) -> list[ModelCard]:
    return [
        ModelCard(
            id=offer.id,
            name=offer.name,
            quant=offer.quant,
            ctx=offer.ctx,
            providers=1,
            verified_providers=1 if verified else 0,
            price_prompt_per_1k=offer.price_prompt_per_1k,
            price_completion_per_1k=offer.price_completion_per_1k,
            chat_format=chat_formats.get(offer.id) or _known(offer.chat_format)
            or guess_chat_format(offer.name),
        )
        for offer in advert.models
    ]


class SingleProviderBackend:
    """Every job goes to one provider the client has connected to (and verified).

    Whether a result is flagged insecure is the client's verdict on the provider's
    attestation (a ``dev`` provider admitted with the insecure flag, or one never
    verified). ``chat_formats`` overrides the guessed chat format per model id.
    """

    def __init__(
        self,
        client: ClientNode,
        advert: Advert,
        *,
        chat_formats: Mapping[str, str] | None = None,
    ) -> None:
        self._client = client
        self._advert = advert
        self._chat_formats = dict(chat_formats or {})

    def _verified(self) -> bool:
        listing = self._client.directory.get(self._advert.peer_id, time.time())
        return listing is not None and listing.verified

    def list_models(self) -> list[ModelCard]:
        return _advert_cards(self._advert, self._chat_formats, self._verified())

    async def complete(self, req: CompletionRequest, on_text: OnText | None) -> CompletionResult:
        peer = self._advert.peer_id
        if self._advert.offer_for(req.model) is None:
            raise BackendError(NO_PROVIDER, f"provider {peer} does not serve {req.model!r}")
        try:
            result = await self._client.ask(
                self._advert,
                req.prompt,
                model=req.model,
                max_tokens=req.max_tokens,
                params=dict(req.params),
                on_text=on_text,
            )
        except PermissionError as exc:  # the provider failed verification
            raise BackendError(NO_PROVIDER, str(exc)) from exc
        except JobError as exc:
            raise backend_error_from_job(exc) from exc
        return CompletionResult(
            text=result.text,
            finish_reason=result.usage.finish_reason,
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            cost_nanoton=result.usage.cost_nanoton,
            provider=peer,
            insecure=self._client.insecure.get(peer, True),
        )


class RoutedBackend:
    """Jobs go to the best verified provider of the model, with failover mid-stream
    (``ClientNode.complete``). Lists the models at least one admitted provider serves."""

    def __init__(self, client: ClientNode, *, chat_formats: Mapping[str, str] | None = None):
        self._client = client
        self._chat_formats = dict(chat_formats or {})

    def list_models(self) -> list[ModelCard]:
        summaries = self._client.directory.models(time.time())
        return [
            ModelCard.from_summary(s, self._chat_formats.get(s.id))
            for s in summaries
            if s.verified_providers > 0
        ]

    async def complete(self, req: CompletionRequest, on_text: OnText | None) -> CompletionResult:
        try:
            result = await self._client.complete(
                req.model,
                req.prompt,
                max_tokens=req.max_tokens,
                params=dict(req.params),
                on_text=on_text,
            )
        except ProvidersBusy as exc:
            raise BackendError(PROVIDER_BUSY, str(exc), retry_after=exc.retry_after) from exc
        except NoProvider as exc:
            raise BackendError(NO_PROVIDER, str(exc)) from exc
        except JobError as exc:
            raise backend_error_from_job(exc) from exc
        except trio.TooSlowError as exc:  # the routed job's overall deadline
            raise BackendError(PROVIDER_TIMEOUT, "the job ran past its deadline") from exc
        producers = [s.provider for s in result.segments if s.completion_tokens]
        last = producers[-1] if producers else result.segments[-1].provider
        return CompletionResult(
            text=result.text,
            finish_reason=result.usage.finish_reason,
            prompt_tokens=result.usage.prompt_tokens,
            completion_tokens=result.usage.completion_tokens,
            cost_nanoton=result.usage.cost_nanoton,
            provider=last,
            insecure=self._client.ran_insecure(result),
        )


def _known(advertised: str) -> str:
    """The provider's advertised chat format if this client knows it, else ""."""
    return advertised if advertised in CHAT_FORMATS else ""
