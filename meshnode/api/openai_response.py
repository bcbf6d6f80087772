"""OpenAI response bodies and stream chunks, field for field.

Chat: ``chat.completion`` objects and ``chat.completion.chunk`` deltas (a first chunk with
the assistant role, content deltas, a final chunk with ``finish_reason``, an optional
usage-only chunk with no choices). Completions: ``text_completion`` objects and chunks.
What OpenAI has no field for rides along in additions its SDKs keep: cost in
``usage.cost_nanoton``, and a top-level ``meshnode`` object naming the provider and
saying when it ran without a TEE.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from meshnode.api.backend import CompletionResult, ModelCard

# Told to the client on every answer a provider without a verified TEE produced.
INSECURE_NOTICE = (
    "the provider ran without a verified TEE: its operator could read this prompt and answer"
)

# Provider finish reasons as OpenAI names them. "unpaid" means the provider stopped at
# the edge of its payment window: cut short, like a length limit.
_FINISH_REASON = {"stop": "stop", "length": "length", "unpaid": "length"}

Kind = Literal["chat", "completion"]


def openai_finish_reason(provider_reason: str) -> str:
    return _FINISH_REASON.get(provider_reason, "stop")


def usage_body(result: CompletionResult) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
        "cost_nanoton": result.cost_nanoton,
    }


def meshnode_body(card: ModelCard, result: CompletionResult) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model_id": card.id,
        "provider": result.provider,
        "cost_nanoton": result.cost_nanoton,
        "finish_reason": result.finish_reason,
        "insecure": result.insecure,
    }
    if result.insecure:
        body["notice"] = INSECURE_NOTICE
    return body


def model_body(card: ModelCard) -> dict[str, Any]:
    return {
        "id": card.id,
        "object": "model",
        "created": 0,  # adverts carry no publication date for a model
        "owned_by": card.owned_by,
        "meshnode": {
            "name": card.name,
            "quant": card.quant,
            "context_length": card.ctx,
            "providers": card.providers,
            "verified_providers": card.verified_providers,
            "price_prompt_nanoton_per_1k": card.price_prompt_per_1k,
            "price_completion_nanoton_per_1k": card.price_completion_per_1k,
            "chat_format": card.chat_format,
        },
    }


@dataclass
class ResponseShaper:
    """Builds every body of one response, with a shared id, timestamp and model name."""

    kind: Kind
    model: str
    card: ModelCard
    created: int
    include_usage: bool = False
    id: str = field(default="")

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl" if self.kind == "chat" else "cmpl"
            self.id = f"{prefix}-{secrets.token_hex(12)}"

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [choice],
        }
        if self.include_usage:
            chunk["usage"] = None  # OpenAI sends null here and the totals in a last chunk
        return chunk

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Sent once the response starts: chat announces the assistant role first."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""}
            return [self._chunk({"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": None})]
        return []

    def text_chunk(self, text: str) -> dict[str, Any]:
        if self.kind == "chat":
            return self._chunk({"index": 0, "delta": {"content": text}, "logprobs": None,
                                "finish_reason": None})
        return self._chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": None})

    def closing_chunks(self, result: CompletionResult) -> list[dict[str, Any]]:
        finish = openai_finish_reason(result.finish_reason)
        if self.kind == "chat":
            last = self._chunk({"index": 0, "delta": {}, "logprobs": None,
                                "finish_reason": finish})
        else:
            last = self._chunk({"index": 0, "text": "", "logprobs": None,
                                "finish_reason": finish})
        last["meshnode"] = meshnode_body(self.card, result)
        chunks = [last]
        if self.include_usage:
            usage_chunk = self._chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = usage_body(result)
            usage_chunk["meshnode"] = meshnode_body(self.card, result)
            chunks.append(usage_chunk)
        return chunks

    def full(self, result: CompletionResult) -> dict[str, Any]:
        """The whole non-streaming response."""
        finish = openai_finish_reason(result.finish_reason)
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [choice],
            "usage": usage_body(result),
            "meshnode": meshnode_body(self.card, result),
        }
