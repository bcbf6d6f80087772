"""What the rest of meshnode needs from an inference engine, and nothing more.

Sampling parameters arrive from the network, so they are validated here with typed
errors; an engine only ever sees values inside the documented ranges.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol

from meshnode.core.text import shown, shown_keys

# Above 2 the distribution is close to uniform noise; OpenAI caps temperature at 2 too.
MAX_TEMPERATURE = 2.0
# Larger k is indistinguishable from "no top-k" on real vocabularies and costs a sort.
MAX_TOP_K = 1000
# llama.cpp seeds are uint32 and 0xFFFFFFFF means "pick a random seed"; keep it out of range.
MAX_SEED = 2**32 - 2
# OpenAI's limits: 4 stop sequences; length bounded so the hold-back buffer stays small.
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
# OpenAI accepts at most 300 biased tokens, each in [-100, 100]; at |100| a token is
# effectively banned or forced, so larger values add nothing.
MAX_LOGIT_BIAS_ENTRIES = 300
MAX_ABS_LOGIT_BIAS = 100.0
# A penalty above 2 wrecks fluency; below 1 it rewards repetition, which is allowed but
# must stay positive (llama.cpp divides logits by it).
MIN_REPEAT_PENALTY = 0.1
MAX_REPEAT_PENALTY = 2.0

# How many bytes of prompt text a prompt may spend per token of context, on average.
# English runs at ~4-5 bytes a token, code at ~3-4, CJK at ~3; a prompt averaging more
# than 8 over a whole context is not text a model reads well. The cap is checked before
# tokenizing: llama.cpp's special-token parsing is quadratic in the special tokens found
# (60,000 "<s>" took 13.6 s on the tiny model, 100k tokens took 127 s on Gemma).
MAX_PROMPT_BYTES_PER_TOKEN = 8

FinishReason = Literal["stop", "length", "cancelled"]
"""Why a generation ended: end-of-generation token or stop string; max_tokens or the
context window reached; the consumer left before the end."""


class InvalidRequest(ValueError):
    """A generation request the engine refuses as given (the caller's fault)."""


class InvalidSamplingParams(InvalidRequest):
    """Sampling parameters out of range or of the wrong type (usually from a peer)."""


class PromptTooLong(InvalidRequest):
    """The prompt leaves no room in the model's context window for any output."""


class EngineError(RuntimeError):
    """The engine failed while generating (not the caller's fault)."""


class EngineUnavailable(EngineError):
    """The engine cannot take work now: its runner crashed, hung or is restarting, or
    the model was withdrawn. Clients should try another provider."""


def max_prompt_bytes(n_ctx: int) -> int:
    """The longest prompt, in UTF-8 bytes, that a context of ``n_ctx`` tokens accepts."""
    return n_ctx * MAX_PROMPT_BYTES_PER_TOKEN


def check_prompt_size(prompt: str, n_ctx: int) -> None:
    """Refuse, before any tokenizing, a prompt too long in bytes for a context of
    ``n_ctx`` tokens (PromptTooLong). Costs O(cap), whatever the prompt's size."""
    limit = max_prompt_bytes(n_ctx)
    # A character is at least one byte: the length alone refuses a huge prompt at once,
    # and only a prompt of at most `limit` characters is encoded to count its bytes.
    size = len(prompt) if len(prompt) > limit else len(prompt.encode("utf-8"))
    if size > limit:
        raise PromptTooLong(
            f"prompt of at least {size} bytes is over the {limit} bytes a context of "
            f"{n_ctx} tokens takes ({MAX_PROMPT_BYTES_PER_TOKEN} bytes per token)"
        )


def _number(name: str, value: object) -> float:
    # bool is an int subclass; a peer sending `true` for a temperature is a bug on its side.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidSamplingParams(f"{name} must be a number, got {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError:  # an int past float's range (JSON allows any size)
        raise InvalidSamplingParams(f"{name} is out of range, got {shown(value)}") from None
    if not math.isfinite(result):
        raise InvalidSamplingParams(f"{name} must be finite, got {shown(value)}")
    return result


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSamplingParams(f"{name} must be an integer, got {type(value).__name__}")
    return value


def _token_id(key: object) -> int:
    # JSON object keys are strings ("123"); msgpack keeps them as ints.
    if isinstance(key, str) and key.isdigit():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
        raise InvalidSamplingParams(f"logit_bias keys must be token ids >= 0, got {shown(key)}")
    return key


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 means greedy (seed then irrelevant)."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40  # 0 disables top-k
    seed: int | None = None  # None: a fresh random seed per generation
    stop: tuple[str, ...] = ()
    # Left out of the hash (a mapping is not hashable) but still compared for equality.
    logit_bias: Mapping[int, float] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    repeat_penalty: float = 1.0  # 1.0 disables the penalty

    def __post_init__(self) -> None:
        temperature = _number("temperature", self.temperature)
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise InvalidSamplingParams(
                f"temperature must be in [0, {MAX_TEMPERATURE}], got {temperature}"
            )
        top_p = _number("top_p", self.top_p)
        if not 0.0 < top_p <= 1.0:
            raise InvalidSamplingParams(f"top_p must be in (0, 1], got {top_p}")
        top_k = _integer("top_k", self.top_k)
        if not 0 <= top_k <= MAX_TOP_K:
            raise InvalidSamplingParams(f"top_k must be in [0, {MAX_TOP_K}], got {top_k}")
        if self.seed is not None:
            seed = _integer("seed", self.seed)
            if not 0 <= seed <= MAX_SEED:
                raise InvalidSamplingParams(f"seed must be in [0, {MAX_SEED}], got {seed}")
        stop = self.stop
        if isinstance(stop, str | bytes) or not isinstance(stop, tuple | list):
            raise InvalidSamplingParams("stop must be a list of strings")
        if len(stop) > MAX_STOP_SEQUENCES:
            raise InvalidSamplingParams(
                f"at most {MAX_STOP_SEQUENCES} stop sequences allowed, got {len(stop)}"
            )
        for s in stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS:
                raise InvalidSamplingParams(
                    f"each stop sequence must be a non-empty string of at most "
                    f"{MAX_STOP_CHARS} characters, got {shown(s)}"
                )
        if not isinstance(self.logit_bias, Mapping):
            raise InvalidSamplingParams("logit_bias must be a mapping of token id to bias")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidSamplingParams(
                f"logit_bias may hold at most {MAX_LOGIT_BIAS_ENTRIES} entries, "
                f"got {len(self.logit_bias)}"
            )
        bias: dict[int, float] = {}
        for key, value in self.logit_bias.items():
            # The usual entry (a msgpack int token id, a float in range) is checked in line:
            # building the named error text below costs ~1 µs an entry, and a 300-entry
            # bias is checked on every job. Anything else takes the full checks.
            if (type(key) is int and key >= 0 and type(value) is float
                    and -MAX_ABS_LOGIT_BIAS <= value <= MAX_ABS_LOGIT_BIAS):
                bias[key] = value  # a NaN fails the range test and goes the long way
                continue
            amount = _number(f"logit_bias[{shown(key)}]", value)
            if abs(amount) > MAX_ABS_LOGIT_BIAS:
                raise InvalidSamplingParams(
                    f"logit_bias values must be in [-{MAX_ABS_LOGIT_BIAS}, "
                    f"{MAX_ABS_LOGIT_BIAS}], got {amount} for token {shown(key)}"
                )
            bias[_token_id(key)] = amount
        repeat_penalty = _number("repeat_penalty", self.repeat_penalty)
        if not MIN_REPEAT_PENALTY <= repeat_penalty <= MAX_REPEAT_PENALTY:
            raise InvalidSamplingParams(
                f"repeat_penalty must be in [{MIN_REPEAT_PENALTY}, {MAX_REPEAT_PENALTY}], "
                f"got {repeat_penalty}"
            )
        # Normalise (ints to floats, list to tuple, a read-only copy of the bias) so equal
        # parameters compare equal and nobody can mutate them after validation.
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_p", top_p)
        object.__setattr__(self, "stop", tuple(stop))
        object.__setattr__(self, "logit_bias", MappingProxyType(bias))
        object.__setattr__(self, "repeat_penalty", repeat_penalty)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingParams:
        """Build from a decoded wire/JSON map; missing keys take the defaults."""
        if not isinstance(data, Mapping):
            raise InvalidSamplingParams(f"sampling params must be a map, got {type(data).__name__}")
        allowed = {"temperature", "top_p", "top_k", "seed", "stop", "logit_bias", "repeat_penalty"}
        unknown = [k for k in data if k not in allowed]
        if unknown:
            # The names come from a peer: shown bounded (a 1 MiB name once froze the node).
            raise InvalidSamplingParams(f"unknown sampling parameter(s): {shown_keys(unknown)}")
        kwargs = dict(data)
        if "stop" in kwargs and isinstance(kwargs["stop"], list):
            kwargs["stop"] = tuple(kwargs["stop"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The wire form; ``from_dict(p.to_dict()) == p``."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": list(self.stop),
            "logit_bias": dict(self.logit_bias),
            "repeat_penalty": self.repeat_penalty,
        }


@dataclass(frozen=True)
class TokenChunk:
    """A piece of generated text and how many sampled tokens it stands for.

    Text is never empty and never ends inside a UTF-8 sequence: tokens whose bytes are not
    yet printable are carried into the next chunk.
    """

    text: str
    n_tokens: int

    def __post_init__(self) -> None:
        if not self.text:
            raise ValueError("a TokenChunk must carry text")
        if self.n_tokens < 1:
            raise ValueError(f"a TokenChunk stands for at least one token, got {self.n_tokens}")


@dataclass(frozen=True)
class Usage:
    """Token counts of one generation, as billed."""

    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class ModelInfo:
    """Identity of a loaded model; model_id is the sha256 hex of the GGUF file."""

    model_id: str
    name: str
    quant: str
    n_ctx: int
    path: Path
    # How a chat becomes this model's prompt ("gemma", "chatml", "llama3", "qa" for a base
    # model without a template); "" when unknown. Advertised so clients format chats.
    chat_format: str = ""


# Markers of the chat templates we know, as found in a GGUF's tokenizer.chat_template.
_TEMPLATE_MARKERS = (
    ("<start_of_turn>", "gemma"),
    ("<|im_start|>", "chatml"),
    ("<|start_header_id|>", "llama3"),
)


def chat_format_of(template: str | None) -> str:
    """The chat format a GGUF's template implies: a base model (no template) continues
    text, so it gets Question/Answer framing; an unknown template gives ""."""
    if not template:
        return "qa"
    for marker, fmt in _TEMPLATE_MARKERS:
        if marker in template:
            return fmt
    return ""


class Generation(Protocol):
    """The token stream of one request; after it ends, finish_reason and usage are final."""

    def __aiter__(self) -> AsyncIterator[TokenChunk]: ...

    async def __anext__(self) -> TokenChunk: ...

    def ready(self) -> list[TokenChunk]:
        """Chunks already produced, without waiting (possibly none): lets a consumer that
        fell behind send them as one batch."""
        ...

    @property
    def finish_reason(self) -> FinishReason | None: ...

    @property
    def usage(self) -> Usage: ...


class Engine(Protocol):
    """A loaded model that streams completions. One engine serves one model."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def available(self) -> bool:
        """False while the engine cannot take jobs (its runner is restarting, say)."""
        ...

    def stream(
        self, prompt: str, params: SamplingParams, max_tokens: int
    ) -> AbstractAsyncContextManager[Generation]:
        """Generate up to max_tokens after prompt; leaving the context stops decoding."""
        ...

    async def count_tokens(self, text: str) -> int:
        """Tokens that ``text`` costs as a prompt (what usage.prompt_tokens will say)."""
        ...

    async def aclose(self) -> None: ...
