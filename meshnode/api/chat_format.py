"""Chat messages to one prompt string, per model family.

A provider runs raw completions; the light client turns OpenAI chat messages into the
prompt the model was trained on. Which template applies is a property of the model
(``ModelCard.chat_format``); ``guess_chat_format`` covers the families we know by name,
and ``generic`` is a plain role-prefixed transcript for everything else.

Templates never emit BOS: the provider's tokenizer adds it when the model wants one, and
a second BOS measurably degrades output on Gemma and Llama 3.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from meshnode.api.errors import bad_request
from meshnode.core.messages import MAX_PROMPT_CHARS
from meshnode.core.text import shown

# Long agent transcripts reach a few hundred turns; more is a runaway client.
MAX_MESSAGES = 512
# A message's content may be split into text parts; real clients send one or two.
MAX_CONTENT_PARTS = 64
# The formatted prompt must fit the job's sealed prompt body; stop early with a clear error.
MAX_CHAT_PROMPT_CHARS = MAX_PROMPT_CHARS

# OpenAI's "developer" role is the newer name for "system"; both mean instructions.
SYSTEM_ROLES = frozenset({"system", "developer"})
ROLES = SYSTEM_ROLES | {"user", "assistant"}


@dataclass(frozen=True)
class ChatMessage:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class ChatFormat:
    """How to render a conversation, and stop strings that end the assistant's turn for
    models that have no dedicated end-of-turn token in this format."""

    name: str
    render: Callable[[Sequence[ChatMessage]], str]
    stop: tuple[str, ...] = ()


def _content_text(raw: object, where: str) -> str:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list):
        if len(raw) > MAX_CONTENT_PARTS:
            raise bad_request(f"{where} has more than {MAX_CONTENT_PARTS} parts", param=where)
        texts = []
        for i, part in enumerate(raw):
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise bad_request(
                    f"{where}[{i}] is of type {kind!r}; only text parts are supported",
                    param=f"{where}[{i}]",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}[{i}].text must be a string", param=f"{where}[{i}]")
            texts.append(text)
        return "".join(texts)
    raise bad_request(f"{where} must be a string or a list of text parts", param=where)


def parse_messages(raw: object) -> list[ChatMessage]:
    """Validate OpenAI chat ``messages``; raises a 400 ``ApiError`` naming the bad field."""
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages must be a non-empty list", param="messages")
    if len(raw) > MAX_MESSAGES:
        raise bad_request(f"at most {MAX_MESSAGES} messages are allowed", param="messages")
    messages = []
    total = 0
    for i, item in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(item, Mapping):
            raise bad_request(f"{where} must be an object", param=where)
        role = item.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a dict or list is unhashable
            raise bad_request(
                f"{where}.role must be one of {sorted(ROLES)}, got {shown(role)} "
                "(tools and function calls are not supported)",
                param=f"{where}.role",
            )
        if item.get("tool_calls") or item.get("function_call"):
            raise bad_request("tool calls are not supported", param=f"{where}.tool_calls")
        content = _content_text(item.get("content"), f"{where}.content")
        total += len(content)
        if total > MAX_CHAT_PROMPT_CHARS:
            raise bad_request(
                f"messages hold more than {MAX_CHAT_PROMPT_CHARS} characters", param="messages"
            )
        messages.append(ChatMessage(role=str(role), content=content))
    return messages


def _render_gemma(messages: Sequence[ChatMessage]) -> str:
    # Gemma has no system turn: its own template prepends system text to the first user
    # turn, separated by a blank line.
    system = "\n\n".join(m.content for m in messages if m.role in SYSTEM_ROLES)
    out = []
    for m in messages:
        if m.role in SYSTEM_ROLES:
            continue
        content = m.content
        if system and m.role == "user":
            content = f"{system}\n\n{content}"
            system = ""
        role = "model" if m.role == "assistant" else "user"
        out.append(f"<start_of_turn>{role}\n{content}<end_of_turn>\n")
    if system:  # only system messages: they become the user turn
        out.append(f"<start_of_turn>user\n{system}<end_of_turn>\n")
    out.append("<start_of_turn>model\n")
    return "".join(out)


def _render_chatml(messages: Sequence[ChatMessage]) -> str:
    out = [
        f"<|im_start|>{'system' if m.role in SYSTEM_ROLES else m.role}\n{m.content}<|im_end|>\n"
        for m in messages
    ]
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def _render_llama3(messages: Sequence[ChatMessage]) -> str:
    out = [
        f"<|start_header_id|>{'system' if m.role in SYSTEM_ROLES else m.role}"
        f"<|end_header_id|>\n\n{m.content}<|eot_id|>"
        for m in messages
    ]
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(out)


_GENERIC_LABELS = {"system": "System", "developer": "System", "user": "User",
                   "assistant": "Assistant"}


def _render_generic(messages: Sequence[ChatMessage]) -> str:
    out = [f"{_GENERIC_LABELS[m.role]}: {m.content}\n\n" for m in messages]
    out.append("Assistant:")
    return "".join(out)


def _render_qa(messages: Sequence[ChatMessage]) -> str:
    # System text leads as context; each user turn is a question, each assistant turn
    # its answer; the prompt ends where the model's answer begins.
    out = [f"{m.content}\n\n" for m in messages if m.role == "system"]
    for m in messages:
        if m.role == "user":
            out.append(f"Question: {m.content}\n")
        elif m.role == "assistant":
            out.append(f"Answer: {m.content}\n")
    out.append("Answer:")
    return "".join(out)


CHAT_FORMATS: Mapping[str, ChatFormat] = {
    f.name: f
    for f in (
        ChatFormat("gemma", _render_gemma),
        ChatFormat("chatml", _render_chatml),
        ChatFormat("llama3", _render_llama3),
        # Base models (no chat template) continue text; Q/A framing gets answers from them.
        ChatFormat("qa", _render_qa, stop=("\nQuestion:",)),
        # A plain transcript has no end-of-turn token; the next speaker's label ends it.
        ChatFormat("generic", _render_generic, stop=("\nUser:", "\nSystem:")),
    )
}
DEFAULT_CHAT_FORMAT = "generic"

# Lower-case substrings of a model's name and the template its family was trained on.
_FAMILY_HINTS = (
    ("gemma", "gemma"),
    ("qwen", "chatml"),
    ("llama-3", "llama3"),
    ("llama3", "llama3"),
)


def guess_chat_format(model_name: str) -> str:
    """The chat format for a model known only by name (adverts carry no template)."""
    lowered = model_name.lower()
    for hint, fmt in _FAMILY_HINTS:
        if hint in lowered:
            return fmt
    return DEFAULT_CHAT_FORMAT


def chat_format(name: str) -> ChatFormat:
    """The registered format called ``name``; ``KeyError`` names the known ones."""
    try:
        return CHAT_FORMATS[name]
    except KeyError:
        raise KeyError(f"unknown chat format {name!r}; known: {sorted(CHAT_FORMATS)}") from None


def render_chat(messages: Sequence[ChatMessage], format_name: str) -> tuple[str, tuple[str, ...]]:
    """The prompt for ``messages`` and the stop strings the format needs."""
    fmt = chat_format(format_name)
    prompt = fmt.render(messages)
    if len(prompt) > MAX_CHAT_PROMPT_CHARS:
        raise bad_request(
            f"the formatted prompt exceeds {MAX_CHAT_PROMPT_CHARS} characters", param="messages"
        )
    return prompt, fmt.stop

