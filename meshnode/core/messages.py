"""Messages of the job protocol `/meshnode/job/1` and their schemas.

Every frame is a msgpack map with a type key `t`. `parse_message` checks the type, the
exact key set and each field's type and range, and returns a frozen dataclass; anything
else raises `SchemaError` or `UnknownMessage`, which close only the stream they came on.
Error messages name what the peer sent only through `core.text.shown`, so their size
does not depend on the frame's.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from meshnode.core.text import shown, shown_keys
from meshnode.core.wire import WireError

JOB_PROTOCOL = "/meshnode/job/1"
PROTOCOL_VERSION = 1

JOB_ID_BYTES = 16  # random 128-bit job ids: collisions are negligible per provider
X25519_KEY_BYTES = 32
SECRETSTREAM_HEADER_BYTES = 24
# A sealed body is one secretstream message; frames bound it, this bounds it tighter for
# token chunks so a provider cannot make the client buffer a megabyte per chunk.
MAX_SEALED_BYTES = (1 << 20) - 1024
MAX_TOKENS_LIMIT = 32_768  # larger than any context we serve; stops absurd requests early
MAX_ERROR_TEXT = 1024  # error messages are for humans and logs, not payloads
MAX_VOUCHER_BYTES = 4096  # a semi-channel state BOC is ~200 bytes; leave room for proofs
MAX_PARAMS_KEYS = 16  # sampling params are a handful of scalars
MAX_RETRY_AFTER_S = 3600.0  # a busy provider asking for more than an hour is broken
CHANNEL_AUTH_BYTES = 64  # an Ed25519 signature (see core.channel_auth)
CHANNEL_KEY_BYTES = 32  # the channel's party-A Ed25519 public key
MODEL_ID_RE = re.compile(r"^[0-9a-f]{64}$")  # sha256 hex of the GGUF file
UINT64_MAX = (1 << 64) - 1
UINT128_MAX = (1 << 128) - 1


class SchemaError(WireError):
    code = "schema"


class UnknownMessage(WireError):
    code = "unknown_message"


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise SchemaError(msg)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(d: dict[str, Any], key: str, lo: int, hi: int) -> int:
    v = d[key]
    _require(_is_int(v) and lo <= v <= hi, f"{key} must be an integer in [{lo}, {hi}]")
    return int(v)


def _bytes(d: dict[str, Any], key: str, *, exact: int | None = None, limit: int = 0) -> bytes:
    v = d[key]
    _require(isinstance(v, bytes), f"{key} must be bytes")
    if exact is not None:
        _require(len(v) == exact, f"{key} must be {exact} bytes, got {len(v)}")
    if limit:
        _require(len(v) <= limit, f"{key} longer than {limit} bytes")
    return bytes(v)


def _str(d: dict[str, Any], key: str, limit: int) -> str:
    v = d[key]
    _require(isinstance(v, str) and len(v) <= limit, f"{key} must be a string of <= {limit}")
    return str(v)


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    KEYS: ClassVar[frozenset[str]] = frozenset()
    OPTIONAL_KEYS: ClassVar[frozenset[str]] = frozenset()
    """Keys a frame may leave out; a frame without them reads as before they existed."""

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Message:
        raise NotImplementedError


@dataclass(frozen=True)
class Open(Message):
    """Client → provider, in clear: what to run and the client's ephemeral key.

    `auth` is present when `channel_id` is: the channel client key's signature binding
    this job to the channel and the provider (core.channel_auth). Left out when None, so
    an Open without a channel is the same frame it was before the field existed.
    """

    TYPE: ClassVar[str] = "open"
    KEYS: ClassVar[frozenset[str]] = frozenset(
        {"t", "v", "job_id", "model_id", "params", "max_tokens", "channel_id", "epk", "hdr"}
    )
    OPTIONAL_KEYS: ClassVar[frozenset[str]] = frozenset({"auth", "ckey"})
    job_id: bytes
    model_id: str
    params: dict[str, Any]
    max_tokens: int
    channel_id: int | None
    client_pub: bytes
    header: bytes
    auth: bytes | None = None
    channel_key: bytes | None = None
    """The channel's party-A key: with the id it names one channel (ids can repeat)."""
    version: int = PROTOCOL_VERSION

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "t": self.TYPE,
            "v": self.version,
            "job_id": self.job_id,
            "model_id": self.model_id,
            "params": self.params,
            "max_tokens": self.max_tokens,
            "channel_id": self.channel_id,
            "epk": self.client_pub,
            "hdr": self.header,
        }
        if self.auth is not None:
            wire["auth"] = self.auth
        if self.channel_key is not None:
            wire["ckey"] = self.channel_key
        return wire

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Open:
        version = _int(d, "v", 0, UINT64_MAX)
        _require(version == PROTOCOL_VERSION, f"unsupported protocol version {version}")
        model_id = d["model_id"]
        _require(
            isinstance(model_id, str) and MODEL_ID_RE.match(model_id) is not None,
            "model_id must be 64 lowercase hex characters",
        )
        params = d["params"]
        _require(isinstance(params, dict), "params must be a map")
        _require(len(params) <= MAX_PARAMS_KEYS, f"params has more than {MAX_PARAMS_KEYS} keys")
        _require(all(isinstance(k, str) for k in params), "params keys must be strings")
        channel = d["channel_id"]
        _require(
            channel is None or (_is_int(channel) and 0 <= channel <= UINT128_MAX),
            "channel_id must be null or a uint128",
        )
        auth = d.get("auth")
        if auth is not None:
            auth = _bytes(d, "auth", exact=CHANNEL_AUTH_BYTES)
        ckey = d.get("ckey")
        if ckey is not None:
            ckey = _bytes(d, "ckey", exact=CHANNEL_KEY_BYTES)
        return cls(
            job_id=_bytes(d, "job_id", exact=JOB_ID_BYTES),
            model_id=model_id,
            params=dict(params),
            max_tokens=_int(d, "max_tokens", 1, MAX_TOKENS_LIMIT),
            channel_id=channel,
            client_pub=_bytes(d, "epk", exact=X25519_KEY_BYTES),
            header=_bytes(d, "hdr", exact=SECRETSTREAM_HEADER_BYTES),
            auth=auth,
            channel_key=ckey,
            version=version,
        )


@dataclass(frozen=True)
class Sealed(Message):
    """A sealed body; which one (prompt, tokens, done) is implied by direction and order
    and repeated inside the plaintext, so a relay learns only sizes and timing."""

    TYPE: ClassVar[str] = "sealed"
    KEYS: ClassVar[frozenset[str]] = frozenset({"t", "c"})
    ciphertext: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "c": self.ciphertext}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Sealed:
        return cls(ciphertext=_bytes(d, "c", limit=MAX_SEALED_BYTES))


@dataclass(frozen=True)
class Accept(Message):
    """Provider → client: the job is admitted; the provider's secretstream header.

    A priced provider adds the basis of its bill: the prompt's token count and what it
    counts as owed on the channel before this job (core.meter), so the client can pay
    exactly what it receives even if the job breaks before its Done. Left out when None.
    """

    TYPE: ClassVar[str] = "accept"
    KEYS: ClassVar[frozenset[str]] = frozenset({"t", "hdr"})
    OPTIONAL_KEYS: ClassVar[frozenset[str]] = frozenset({"ptok", "owed"})
    header: bytes
    prompt_tokens: int | None = None
    owed_before: int | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"t": self.TYPE, "hdr": self.header}
        if self.prompt_tokens is not None:
            wire["ptok"] = self.prompt_tokens
        if self.owed_before is not None:
            wire["owed"] = self.owed_before
        return wire

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Accept:
        return cls(
            header=_bytes(d, "hdr", exact=SECRETSTREAM_HEADER_BYTES),
            prompt_tokens=_int(d, "ptok", 0, UINT64_MAX) if "ptok" in d else None,
            owed_before=_int(d, "owed", 0, UINT64_MAX) if "owed" in d else None,
        )


@dataclass(frozen=True)
class VoucherMsg(Message):
    """Client → provider: a signed payment-channel state (BOC), checked by the meter."""

    TYPE: ClassVar[str] = "voucher"
    KEYS: ClassVar[frozenset[str]] = frozenset({"t", "boc"})
    boc: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "boc": self.boc}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> VoucherMsg:
        return cls(boc=_bytes(d, "boc", limit=MAX_VOUCHER_BYTES))


@dataclass(frozen=True)
class NeedPayment(Message):
    """Provider → client: generation is paused until vouchers cover `owed` nanoton."""

    TYPE: ClassVar[str] = "need_payment"
    KEYS: ClassVar[frozenset[str]] = frozenset({"t", "owed", "delivered"})
    owed: int
    delivered: int

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "owed": self.owed, "delivered": self.delivered}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> NeedPayment:
        return cls(
            owed=_int(d, "owed", 0, UINT64_MAX),
            delivered=_int(d, "delivered", 0, UINT64_MAX),
        )


@dataclass(frozen=True)
class Busy(Message):
    """Provider → client: no slot and no queue room; try another provider."""

    TYPE: ClassVar[str] = "busy"
    KEYS: ClassVar[frozenset[str]] = frozenset({"t", "retry_after"})
    retry_after: float

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "retry_after": self.retry_after}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Busy:
        v = d["retry_after"]
        _require(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= MAX_RETRY_AFTER_S,
            f"retry_after must be a number in [0, {MAX_RETRY_AFTER_S}]",
        )
        return cls(retry_after=float(v))


@dataclass(frozen=True)
class ErrorMsg(Message):
    """Either direction: the sender is closing this stream for the stated reason."""

    TYPE: ClassVar[str] = "error"
    KEYS: ClassVar[frozenset[str]] = frozenset({"t", "code", "msg"})
    code: str
    msg: str = field(default="")

    def to_wire(self) -> dict[str, Any]:
        return {"t": self.TYPE, "code": self.code, "msg": self.msg[:MAX_ERROR_TEXT]}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> ErrorMsg:
        return cls(code=_str(d, "code", 64), msg=_str(d, "msg", MAX_ERROR_TEXT))


MESSAGE_TYPES: dict[str, type[Message]] = {
    m.TYPE: m for m in (Open, Sealed, Accept, VoucherMsg, NeedPayment, Busy, ErrorMsg)
}


def parse_message(d: dict[str, Any]) -> Message:
    kind = d.get("t")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UnknownMessage(f"unknown message type {shown(kind)}")
    keys = set(d) - cls.OPTIONAL_KEYS
    if keys != cls.KEYS:
        missing = sorted(cls.KEYS - keys)  # our own key names: short and few
        extra = [k for k in keys if k not in cls.KEYS]  # the peer's: shown bounded
        raise SchemaError(f"{cls.TYPE}: missing {missing} unexpected {shown_keys(extra)}")
    return cls.from_wire(d)


# Sealed plaintext bodies ------------------------------------------------------------

BodyCheck = Callable[[dict[str, Any]], None]

MAX_PROMPT_CHARS = 512 * 1024  # ~128k tokens of text; beyond any context we serve
MAX_CHUNK_TEXT = 64 * 1024  # one token chunk is a few characters; batching stays small


def check_prompt_body(d: dict[str, Any]) -> str:
    _require(set(d) == {"k", "prompt"} and d["k"] == "prompt", "expected a prompt body")
    return _str(d, "prompt", MAX_PROMPT_CHARS)


def check_tokens_body(d: dict[str, Any]) -> tuple[str, int, int]:
    """(text, tokens in this chunk, cumulative tokens)."""
    _require(set(d) == {"k", "text", "n", "total"} and d["k"] == "tokens", "expected tokens")
    return (
        _str(d, "text", MAX_CHUNK_TEXT),
        _int(d, "n", 0, MAX_TOKENS_LIMIT),
        _int(d, "total", 0, MAX_TOKENS_LIMIT),
    )


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    cost_nanoton: int = 0

    def to_body(self) -> dict[str, Any]:
        return {
            "k": "done",
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "cost": self.cost_nanoton,
        }


FINISH_REASONS = frozenset({"stop", "length", "cancelled", "unpaid"})


def check_done_body(d: dict[str, Any]) -> Usage:
    keys = {"k", "prompt_tokens", "completion_tokens", "finish_reason", "cost"}
    _require(set(d) == keys and d["k"] == "done", "expected a done body")
    reason = _str(d, "finish_reason", 16)
    _require(reason in FINISH_REASONS, f"unknown finish_reason {shown(reason)}")
    return Usage(
        prompt_tokens=_int(d, "prompt_tokens", 0, UINT64_MAX),
        completion_tokens=_int(d, "completion_tokens", 0, MAX_TOKENS_LIMIT),
        finish_reason=reason,
        cost_nanoton=_int(d, "cost", 0, UINT64_MAX),
    )
