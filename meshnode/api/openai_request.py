"""Validate OpenAI ``/v1/chat/completions`` and ``/v1/completions`` request bodies.

Each parser takes the decoded JSON body and the models on offer and returns a
``ParsedRequest`` holding the backend request, or raises a 400/404 ``ApiError`` that
names the offending parameter, as OpenAI does. Unsupported features (n > 1, tools,
logprobs, echo...) are refused rather than silently ignored, so a client never gets an
answer to a question it did not ask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from meshnode.api.backend import BackendError, CompletionRequest, ModelCard, resolve_model
from meshnode.api.chat_format import parse_messages, render_chat
from meshnode.api.errors import ApiError, bad_request
from meshnode.core.messages import MAX_PROMPT_CHARS, MAX_TOKENS_LIMIT
from meshnode.core.text import SHOWN_LIMIT, shown
from meshnode.engine.base import MAX_STOP_SEQUENCES, InvalidSamplingParams, SamplingParams

# OpenAI's documented default for /v1/completions.
DEFAULT_COMPLETION_MAX_TOKENS = 16
# OpenAI lets a chat run to the end of the context; over a pay-per-token mesh a bounded
# default keeps a forgotten max_tokens from buying a whole context window of text.
DEFAULT_CHAT_MAX_TOKENS = 1024

# Request fields OpenAI SDKs and tools commonly send that change nothing for us.
_IGNORED = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls"})
# OpenAI names → SamplingParams keys; top_k and repeat_penalty are llama.cpp extensions
# (pass them with the SDK's ``extra_body``).
_SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "logit_bias": "logit_bias",
    "top_k": "top_k",
    "repeat_penalty": "repeat_penalty",
}
_COMMON = frozenset(
    {"model", "n", "max_tokens", "stream", "stream_options", "stop", "frequency_penalty",
     "presence_penalty", "logprobs"}
) | _IGNORED | frozenset(_SAMPLING)
_CHAT_ONLY = frozenset(
    {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "functions",
     "function_call", "response_format"}
)
_COMPLETION_ONLY = frozenset({"prompt", "echo", "suffix", "best_of"})


@dataclass(frozen=True)
class ParsedRequest:
    requested_model: str  # echoed in responses, as the client wrote it
    card: ModelCard
    request: CompletionRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage: a final usage-only chunk


def _check_keys(body: Mapping[str, Any], allowed: frozenset[str]) -> None:
    for key in body:
        if key not in allowed:
            name = str(key)[:SHOWN_LIMIT]  # bounded: the body's keys are the caller's
            raise bad_request(f"Unrecognized request argument supplied: {name}", param=name)


def _require_absent_or(body: Mapping[str, Any], key: str, *neutral: object) -> None:
    """Refuse a feature we do not implement unless the client set it to its no-op value."""
    value = body.get(key)
    if value is not None and not any(value == n and type(value) is type(n) for n in neutral):
        raise bad_request(f"{key}={shown(value)} is not supported by this endpoint", param=key)


def _model(body: Mapping[str, Any], cards: Sequence[ModelCard]) -> tuple[str, ModelCard]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("model is required and must be a string", param="model")
    try:
        return model, resolve_model(cards, model)
    except BackendError as exc:
        code = "model_not_found" if exc.http_status == 404 else exc.code
        raise ApiError(exc.http_status, exc.message, param="model", code=code) from exc


def _max_tokens(body: Mapping[str, Any], keys: Sequence[str], default: int, ctx: int) -> int:
    ceiling = min(MAX_TOKENS_LIMIT, ctx) if ctx > 0 else MAX_TOKENS_LIMIT
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ceiling:
            raise bad_request(
                f"{key} must be an integer in [1, {ceiling}] (the model's context is {ctx} "
                f"tokens), got {value!r}",
                param=key,
            )
        return value
    return min(default, ceiling)


def _stop(body: Mapping[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list):
        raise bad_request("stop must be a string or a list of strings", param="stop")
    try:
        SamplingParams.from_dict({"stop": stops})
    except InvalidSamplingParams as exc:
        raise bad_request(str(exc), param="stop") from exc
    return list(stops)


def _sampling(
    body: Mapping[str, Any], stops: list[str], format_stops: Sequence[str]
) -> dict[str, Any]:
    """Only the parameters the client set, each checked on its own so errors name it."""
    params: dict[str, Any] = {}
    for key, name in _SAMPLING.items():
        value = body.get(key)
        if value is None:
            continue
        try:
            SamplingParams.from_dict({name: value})
        except InvalidSamplingParams as exc:
            raise bad_request(str(exc), param=key) from exc
        if name == "logit_bias":
            # JSON keys are strings; the wire and the engine want token ids.
            value = {int(k): v for k, v in value.items()}
        params[name] = value
    # The chat format's own stops go after the client's, as many as fit.
    merged = list(stops)
    for s in format_stops:
        if len(merged) < MAX_STOP_SEQUENCES and s not in merged:
            merged.append(s)
    if merged:
        params["stop"] = merged
    return params


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request("stream must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is None:
        return bool(stream), False
    if not stream:
        raise bad_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    if not isinstance(options, Mapping) or set(options) - {"include_usage"}:
        raise bad_request("stream_options supports only include_usage", param="stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad_request("stream_options.include_usage must be a boolean",
                          param="stream_options.include_usage")
    return True, include


def _common_refusals(body: Mapping[str, Any]) -> None:
    _require_absent_or(body, "n", 1)
    _require_absent_or(body, "frequency_penalty", 0, 0.0)
    _require_absent_or(body, "presence_penalty", 0, 0.0)


def parse_chat_request(body: object, cards: Sequence[ModelCard]) -> ParsedRequest:
    if not isinstance(body, Mapping):
        raise bad_request("the request body must be a JSON object")
    _check_keys(body, _COMMON | _CHAT_ONLY)
    _common_refusals(body)
    _require_absent_or(body, "logprobs", False)
    _require_absent_or(body, "top_logprobs", 0)
    for key in ("tools", "functions"):
        _require_absent_or(body, key, [])
    for key in ("tool_choice", "function_call"):
        _require_absent_or(body, key, "none")
    response_format = body.get("response_format")
    if response_format is not None and response_format != {"type": "text"}:
        raise bad_request("only response_format {'type': 'text'} is supported",
                          param="response_format")
    requested, card = _model(body, cards)
    messages = parse_messages(body.get("messages"))
    stops = _stop(body)
    stream, include_usage = _stream(body)
    max_tokens = _max_tokens(
        body, ("max_completion_tokens", "max_tokens"), DEFAULT_CHAT_MAX_TOKENS, card.ctx
    )
    prompt, format_stops = render_chat(messages, card.chat_format)
    params = _sampling(body, stops, format_stops)
    return ParsedRequest(
        requested_model=requested,
        card=card,
        request=CompletionRequest(card.id, prompt, max_tokens, params),
        stream=stream,
        include_usage=include_usage,
    )


def _prompt(body: Mapping[str, Any]) -> str:
    prompt = body.get("prompt")
    # OpenAI also takes a batch of prompts or token arrays; one text prompt is what a
    # single job can carry.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("prompt must be a string (batches and token arrays are not "
                          "supported)", param="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise bad_request(f"prompt exceeds {MAX_PROMPT_CHARS} characters", param="prompt")
    return prompt


def parse_completion_request(body: object, cards: Sequence[ModelCard]) -> ParsedRequest:
    if not isinstance(body, Mapping):
        raise bad_request("the request body must be a JSON object")
    _check_keys(body, _COMMON | _COMPLETION_ONLY)
    _common_refusals(body)
    _require_absent_or(body, "logprobs", 0)
    _require_absent_or(body, "echo", False)
    _require_absent_or(body, "suffix", "")
    _require_absent_or(body, "best_of", 1)
    requested, card = _model(body, cards)
    prompt = _prompt(body)
    stops = _stop(body)
    stream, include_usage = _stream(body)
    max_tokens = _max_tokens(body, ("max_tokens",), DEFAULT_COMPLETION_MAX_TOKENS, card.ctx)
    params = _sampling(body, stops, ())
    return ParsedRequest(
        requested_model=requested,
        card=card,
        request=CompletionRequest(card.id, prompt, max_tokens, params),
        stream=stream,
        include_usage=include_usage,
    )
