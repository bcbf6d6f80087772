"""Signed capability adverts: what a provider offers, encoded canonically and verified.

Wire format (version 1)::

    envelope = msgpack [version: int, body: bin, signature: bin]
    body     = canonical msgpack map of the advert fields (keys sorted, fixed types)
    signature = Ed25519(peer key, ADVERT_DOMAIN_TAG || body)

The signature covers the body *bytes* as received, so a receiver never re-serialises
before checking it. The body must also be canonical (re-encoding the decoded advert
gives the same bytes), so one advert has exactly one encoding and can be deduplicated by
hash. Every check a receiver makes raises ``AdvertRejected`` with a ``RejectReason`` so
callers (the ``Directory``) can count rejections per cause.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from meshnode.core.peerid import (
    ED25519_PUBLIC_KEY_LEN,
    MAX_PEER_ID_TEXT_LEN,
    peer_id_from_ed25519,
)
from meshnode.core.text import shown

ADVERT_VERSION = 1  # bump when the body schema changes; receivers reject unknown versions
# Separates advert signatures from every other Ed25519 signature made with the node key
# (libp2p handshakes, payment states), so one can never be replayed as another.
ADVERT_DOMAIN_TAG = b"meshnode/advert/1\x00"

# gossipsub's default max message is 1 MiB; a TDX quote with its PCK chain is ~8 KiB and
# NVIDIA GPU evidence ~20 KiB, so 64 KiB fits real evidence with room and keeps a flood
# of maximal adverts cheap to reject.
MAX_ADVERT_BYTES = 64 * 1024
MAX_EVIDENCE_BYTES = 48 * 1024  # the bulk of MAX_ADVERT_BYTES; the rest is small fields
MAX_EVIDENCE_DEPTH = 8  # evidence maps nest 2-3 deep in practice; bounds recursion
MAX_MODELS = 32  # one GPU node rarely holds more than a handful of GGUFs in memory
MAX_ADDRS = 16  # ip4/ip6 x tcp/quic x a few interfaces and relay circuits
MAX_ADDR_LEN = 256  # a relayed /p2p-circuit multiaddr with two peer ids is ~200 chars
MAX_MODEL_NAME_LEN = 128  # Hugging Face repo/file style names fit comfortably
MAX_QUANT_LEN = 32  # "Q4_K_M", "IQ2_XXS", "BF16": short tags
MAX_WALLET_ADDR_LEN = 80  # raw form "-1:" + 64 hex = 67 chars; user-friendly is 48
MAX_CREDIT_WINDOW_TOKENS = 1 << 16  # far above any useful window; bounds the deposit check
MAX_CONTEXT_TOKENS = 1 << 24  # 16M tokens: above any GGUF context length we know of
MAX_SLOTS = 1024  # llama.cpp parallel slots; far above what one GPU can run usefully
MAX_TOKENS_PER_S = 1_000_000.0  # generous ceiling that still rejects nonsense and inf
MAX_QUEUE_LEN = 1 << 20  # a longer queue means the provider is broken, not busy
# 1e6 TON per 1k tokens is absurd as a price yet keeps price x tokens far inside int64.
MAX_PRICE_NANOTON_PER_1K = 10**15
MAX_SEQ = 2**63 - 1  # stored as int64 by peers in other languages
# Hosts without good NTP drift by tens of seconds; two minutes tolerates them while an
# advert from the future cannot outlive its stated lifetime by much.
MAX_CLOCK_SKEW_S = 120.0
# Providers republish every minute or so; a 15-minute ceiling bounds how long a provider
# that went away (or whose attestation was revoked) stays listed by others.
MAX_ADVERT_LIFETIME_S = 900.0

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CHAT_FORMAT = re.compile(r"[a-z0-9_-]{1,32}")  # names like "gemma", "chatml", "qa"
_RAW_TON_ADDR = re.compile(r"-?[0-9]{1,3}:[0-9a-fA-F]{64}")
_FRIENDLY_TON_ADDR = re.compile(r"[A-Za-z0-9_\-+/]{48}")
_INT64_MIN, _INT64_MAX = -(2**63), 2**64 - 1  # msgpack int range

_SIGNATURE_LEN = 64  # Ed25519
_X25519_PUBLIC_KEY_LEN = 32
_ED25519_SEED_LEN = 32


class RejectReason(StrEnum):
    """Why an advert was not accepted; values double as counter names."""

    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_SIGNATURE = "bad_signature"
    PEER_ID_MISMATCH = "peer_id_mismatch"
    EXPIRED = "expired"
    FROM_FUTURE = "from_future"
    LIFETIME_TOO_LONG = "lifetime_too_long"
    BAD_MODEL_ID = "bad_model_id"
    TOO_MANY_MODELS = "too_many_models"
    TOO_MANY_ADDRS = "too_many_addrs"
    EVIDENCE_TOO_LARGE = "evidence_too_large"
    # Raised by the Directory, never by decoding alone:
    STALE_SEQ = "stale_seq"
    RATE_LIMITED = "rate_limited"
    DIRECTORY_FULL = "directory_full"


class AdvertRejected(Exception):
    """An advert failed a check; ``reason`` says which, ``msg`` says what exactly."""

    def __init__(self, reason: RejectReason, msg: str) -> None:
        super().__init__(f"{reason.value}: {msg}")
        self.reason = reason
        self.msg = msg


Evidence = bytes | Mapping[str, Any]
"""Attestation evidence, opaque to adverts: bytes, or a map of msgpack-able values."""


@dataclass(frozen=True)
class ModelOffer:
    """One model a provider serves, and its price."""

    id: str  # sha256 of the GGUF file, 64 lowercase hex
    name: str
    quant: str
    ctx: int  # context length in tokens
    price_prompt_per_1k: int  # nanoton per 1000 prompt tokens
    price_completion_per_1k: int  # nanoton per 1000 completion tokens
    chat_format: str = ""  # how clients turn a chat into a prompt; "" = unknown (guess)
    # False while the provider's engine runner restarts or after it withdrew the model:
    # the offer stays visible (price, identity) but gets no jobs.
    available: bool = True


@dataclass(frozen=True)
class Capacity:
    slots: int  # jobs the provider runs at once
    tokens_per_s: float  # measured decode speed per slot


@dataclass(frozen=True)
class Load:
    busy_slots: int
    queue_len: int


@dataclass(frozen=True)
class TonPayee:
    channel_pubkey: bytes  # Ed25519, 32 bytes; signs payment-channel states
    wallet_address: str
    # Tokens the provider produces ahead of payment: a channel must keep that much
    # unspent deposit (plus any debt) to be admitted. 0: not advertised.
    credit_window_tokens: int = 0


@dataclass(frozen=True)
class Advert:
    peer_id: str
    peer_pubkey: bytes  # Ed25519, 32 bytes; the key the peer id is derived from
    addrs: tuple[str, ...]
    models: tuple[ModelOffer, ...]
    capacity: Capacity
    load: Load
    job_pubkey: bytes  # X25519, 32 bytes; clients seal jobs to it
    seq: int
    issued_at: float  # unix seconds
    expires_at: float  # unix seconds
    attestation: Evidence = field(default=b"", hash=False)
    ton: TonPayee | None = None

    def offer_for(self, model: str) -> ModelOffer | None:
        """The offer matching a model id (sha256 hex) or, failing that, a model name."""
        for offer in self.models:
            if offer.id == model:
                return offer
        for offer in self.models:
            if offer.name == model:
                return offer
        return None


# ---------------------------------------------------------------------------- encoding


def _canonical_evidence(value: Any, depth: int = 0) -> Any:
    """Evidence with map keys sorted, so it encodes one way only; rejects odd types."""
    if depth > MAX_EVIDENCE_DEPTH:
        raise AdvertRejected(RejectReason.MALFORMED, "attestation evidence nests too deep")
    if value is None or isinstance(value, bool | str | bytes):
        return value
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise AdvertRejected(RejectReason.MALFORMED, "evidence integer out of range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise AdvertRejected(RejectReason.MALFORMED, "evidence float is not finite")
        return value
    if isinstance(value, list | tuple):
        return [_canonical_evidence(v, depth + 1) for v in value]
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise AdvertRejected(RejectReason.MALFORMED, "evidence map keys must be strings")
        return {k: _canonical_evidence(value[k], depth + 1) for k in sorted(value)}
    raise AdvertRejected(
        RejectReason.MALFORMED, f"evidence holds unsupported type {type(value).__name__}"
    )


def _sorted_map(items: Mapping[str, Any]) -> dict[str, Any]:
    return {k: items[k] for k in sorted(items)}


def _offer_to_wire(offer: ModelOffer) -> dict[str, Any]:
    wire: dict[str, Any] = {
        "id": offer.id,
        "name": offer.name,
        "quant": offer.quant,
        "ctx": offer.ctx,
        "pp": offer.price_prompt_per_1k,
        "pc": offer.price_completion_per_1k,
    }
    if offer.chat_format:  # optional: adverts without it keep their exact encoding
        wire["chat"] = offer.chat_format
    if not offer.available:  # optional likewise: only an unavailable model says so
        wire["down"] = True
    return _sorted_map(wire)


def _advert_to_wire(advert: Advert) -> dict[str, Any]:
    ton = (
        None
        if advert.ton is None
        else _sorted_map(
            {"pk": advert.ton.channel_pubkey, "addr": advert.ton.wallet_address}
            # optional: adverts without a window keep their exact encoding
            | ({"win": advert.ton.credit_window_tokens} if advert.ton.credit_window_tokens
               else {})
        )
    )
    return _sorted_map(
        {
            "pid": advert.peer_id,
            "pk": advert.peer_pubkey,
            "addrs": list(advert.addrs),
            "models": [_offer_to_wire(m) for m in advert.models],
            "cap": _sorted_map(
                {"slots": advert.capacity.slots, "tps": float(advert.capacity.tokens_per_s)}
            ),
            "load": _sorted_map({"busy": advert.load.busy_slots, "queue": advert.load.queue_len}),
            "jpk": advert.job_pubkey,
            "att": _canonical_evidence(advert.attestation),
            "ton": ton,
            "seq": advert.seq,
            "iat": float(advert.issued_at),
            "exp": float(advert.expires_at),
        }
    )


def encode_body(advert: Advert) -> bytes:
    """Canonical msgpack body of an advert, unchecked (see ``encode_signed``)."""
    packed: bytes = msgpack.packb(_advert_to_wire(advert), use_bin_type=True)
    return packed


def sign_body(body: bytes, seed: bytes) -> bytes:
    """Wrap already-encoded body bytes in a signed envelope. Low level: performs no
    checks on the body; use ``encode_signed`` to publish a real advert."""
    if len(seed) != _ED25519_SEED_LEN:
        raise ValueError(f"Ed25519 seed must be {_ED25519_SEED_LEN} bytes, got {len(seed)}")
    signature = SigningKey(seed).sign(ADVERT_DOMAIN_TAG + body).signature
    packed: bytes = msgpack.packb([ADVERT_VERSION, body, signature], use_bin_type=True)
    return packed


def encode_signed(advert: Advert, seed: bytes) -> bytes:
    """Signed envelope for ``advert``, checked the way receivers will check it.

    Raises ``ValueError`` if ``seed`` is not the key behind ``advert.peer_pubkey`` and
    ``AdvertRejected`` if any receiver would reject the advert on its structure (time
    checks are left to receivers, which have their own clocks).
    """
    if len(seed) != _ED25519_SEED_LEN:
        raise ValueError(f"Ed25519 seed must be {_ED25519_SEED_LEN} bytes, got {len(seed)}")
    if bytes(SigningKey(seed).verify_key) != advert.peer_pubkey:
        raise ValueError("signing seed does not belong to advert.peer_pubkey")
    body = encode_body(advert)
    data = sign_body(body, seed)
    if len(data) > MAX_ADVERT_BYTES:
        raise AdvertRejected(
            RejectReason.TOO_LARGE, f"advert is {len(data)} bytes, limit {MAX_ADVERT_BYTES}"
        )
    checked = _advert_from_wire(_unpack(body, "advert body"))
    _check_peer_id(checked)
    return data


# ---------------------------------------------------------------------------- decoding


def _unpack(data: bytes, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except (msgpack.exceptions.UnpackException, ValueError, TypeError, OverflowError) as e:
        reason = f"{what} is not msgpack: {shown(str(e))}"
        raise AdvertRejected(RejectReason.MALFORMED, reason) from e


def _malformed(msg: str) -> AdvertRejected:
    return AdvertRejected(RejectReason.MALFORMED, msg)


def _map(value: Any, keys: set[str], what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _malformed(f"{what} must be a map")
    if set(value) != keys:
        missing, extra = keys - set(value), set(value) - keys
        raise _malformed(f"{what} fields wrong: missing {sorted(missing)}, extra {sorted(extra)}")
    return value


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _malformed(f"{what} must be an integer")
    if not lo <= value <= hi:
        raise _malformed(f"{what}={value} outside [{lo}, {hi}]")
    return value


def _float(value: Any, what: str, lo: float, hi: float) -> float:
    if not isinstance(value, float) or not math.isfinite(value):
        raise _malformed(f"{what} must be a finite float")
    if not lo <= value <= hi:
        raise _malformed(f"{what}={value} outside [{lo}, {hi}]")
    return value


def _str(value: Any, what: str, max_len: int) -> str:
    if not isinstance(value, str):
        raise _malformed(f"{what} must be a string")
    if not 0 < len(value) <= max_len:
        raise _malformed(f"{what} length {len(value)} outside [1, {max_len}]")
    return value


def _key(value: Any, what: str, length: int) -> bytes:
    if not isinstance(value, bytes) or len(value) != length:
        raise _malformed(f"{what} must be {length} bytes")
    return value


def _offer_from_wire(value: Any) -> ModelOffer:
    keys = {"id", "name", "quant", "ctx", "pp", "pc"}
    if isinstance(value, dict):
        keys |= {k for k in ("chat", "down") if k in value}
    m = _map(value, keys, "model")
    if m.get("down", True) is not True:
        raise _malformed("model 'down' flag must be true when present")
    chat = m.get("chat", "")
    if chat != "" and (not isinstance(chat, str) or _CHAT_FORMAT.fullmatch(chat) is None):
        raise _malformed(f"model chat format {str(chat)[:40]!r} is not a short identifier")
    model_id = m["id"]
    if not isinstance(model_id, str) or _SHA256_HEX.fullmatch(model_id) is None:
        raise AdvertRejected(
            RejectReason.BAD_MODEL_ID,
            f"model id {str(model_id)[:80]!r} is not a 64-char lowercase hex sha256",
        )
    return ModelOffer(
        id=model_id,
        name=_str(m["name"], "model name", MAX_MODEL_NAME_LEN),
        quant=_str(m["quant"], "model quant", MAX_QUANT_LEN),
        ctx=_int(m["ctx"], "model ctx", 1, MAX_CONTEXT_TOKENS),
        price_prompt_per_1k=_int(m["pp"], "prompt price", 0, MAX_PRICE_NANOTON_PER_1K),
        price_completion_per_1k=_int(m["pc"], "completion price", 0, MAX_PRICE_NANOTON_PER_1K),
        chat_format=chat,
        available="down" not in m,
    )


def _ton_from_wire(value: Any) -> TonPayee | None:
    if value is None:
        return None
    keys = {"pk", "addr", "win"} if isinstance(value, dict) and "win" in value else {"pk", "addr"}
    t = _map(value, keys, "ton")
    addr = _str(t["addr"], "wallet address", MAX_WALLET_ADDR_LEN)
    if _RAW_TON_ADDR.fullmatch(addr) is None and _FRIENDLY_TON_ADDR.fullmatch(addr) is None:
        raise _malformed(f"wallet address {addr!r} is neither raw nor user-friendly TON form")
    return TonPayee(
        channel_pubkey=_key(t["pk"], "channel pubkey", ED25519_PUBLIC_KEY_LEN),
        wallet_address=addr,
        credit_window_tokens=_int(t["win"], "credit window", 1, MAX_CREDIT_WINDOW_TOKENS)
        if "win" in t else 0,
    )


_ADVERT_KEYS = {
    "pid", "pk", "addrs", "models", "cap", "load", "jpk", "att", "ton", "seq", "iat", "exp"
}  # fmt: skip


def _advert_from_wire(value: Any) -> Advert:
    w = _map(value, _ADVERT_KEYS, "advert")
    addrs, models = w["addrs"], w["models"]
    if not isinstance(addrs, list) or not isinstance(models, list):
        raise _malformed("addrs and models must be arrays")
    if len(addrs) > MAX_ADDRS:
        raise AdvertRejected(
            RejectReason.TOO_MANY_ADDRS, f"{len(addrs)} listen addrs, limit {MAX_ADDRS}"
        )
    if len(models) > MAX_MODELS:
        raise AdvertRejected(
            RejectReason.TOO_MANY_MODELS, f"{len(models)} models, limit {MAX_MODELS}"
        )
    offers = tuple(_offer_from_wire(m) for m in models)
    if len({o.id for o in offers}) != len(offers):
        raise _malformed("the same model id is offered twice")
    att = w["att"]
    if not isinstance(att, bytes | dict):
        raise _malformed("attestation evidence must be bytes or a map")
    att_size = len(msgpack.packb(att, use_bin_type=True))
    if att_size > MAX_EVIDENCE_BYTES:
        raise AdvertRejected(
            RejectReason.EVIDENCE_TOO_LARGE,
            f"attestation evidence is {att_size} bytes, limit {MAX_EVIDENCE_BYTES}",
        )
    cap = _map(w["cap"], {"slots", "tps"}, "capacity")
    load = _map(w["load"], {"busy", "queue"}, "load")
    return Advert(
        peer_id=_str(w["pid"], "peer id", MAX_PEER_ID_TEXT_LEN),
        peer_pubkey=_key(w["pk"], "peer pubkey", ED25519_PUBLIC_KEY_LEN),
        addrs=tuple(_str(a, "listen addr", MAX_ADDR_LEN) for a in addrs),
        models=offers,
        capacity=Capacity(
            slots=_int(cap["slots"], "slots", 1, MAX_SLOTS),
            tokens_per_s=_float(cap["tps"], "tokens_per_s", 0.0, MAX_TOKENS_PER_S),
        ),
        load=Load(
            busy_slots=_int(load["busy"], "busy slots", 0, MAX_SLOTS),
            queue_len=_int(load["queue"], "queue length", 0, MAX_QUEUE_LEN),
        ),
        job_pubkey=_key(w["jpk"], "job pubkey", _X25519_PUBLIC_KEY_LEN),
        attestation=_canonical_evidence(att),
        ton=_ton_from_wire(w["ton"]),
        seq=_int(w["seq"], "seq", 0, MAX_SEQ),
        issued_at=_float(w["iat"], "issued_at", 0.0, math.inf),
        expires_at=_float(w["exp"], "expires_at", 0.0, math.inf),
    )


def _check_peer_id(advert: Advert) -> None:
    if peer_id_from_ed25519(advert.peer_pubkey) != advert.peer_id:
        raise AdvertRejected(
            RejectReason.PEER_ID_MISMATCH,
            f"peer id {advert.peer_id} is not derived from the advert's public key",
        )


def check_times(advert: Advert, now: float) -> None:
    """Reject an advert that is expired, from the future, or claims too long a life."""
    if advert.expires_at <= advert.issued_at:
        raise _malformed("expires_at is not after issued_at")
    if advert.issued_at > now + MAX_CLOCK_SKEW_S:
        raise AdvertRejected(
            RejectReason.FROM_FUTURE,
            f"issued {advert.issued_at - now:.0f} s in the future, "
            f"skew limit {MAX_CLOCK_SKEW_S:.0f} s",
        )
    if advert.expires_at <= now:
        raise AdvertRejected(RejectReason.EXPIRED, f"expired {now - advert.expires_at:.0f} s ago")
    if advert.expires_at - advert.issued_at > MAX_ADVERT_LIFETIME_S:
        raise AdvertRejected(
            RejectReason.LIFETIME_TOO_LONG,
            f"lifetime {advert.expires_at - advert.issued_at:.0f} s, "
            f"limit {MAX_ADVERT_LIFETIME_S:.0f} s",
        )


def decode_and_verify(data: bytes, now: float) -> Advert:
    """The advert in ``data`` if every receiver check passes; ``AdvertRejected`` if not.

    Order: size (before any parsing), envelope, version, body schema, canonical form,
    peer id vs key, signature, times. Cheap structural checks run before the signature
    so junk costs little; nothing is trusted until the signature has been checked.
    """
    if len(data) > MAX_ADVERT_BYTES:
        raise AdvertRejected(
            RejectReason.TOO_LARGE, f"advert is {len(data)} bytes, limit {MAX_ADVERT_BYTES}"
        )
    envelope = _unpack(data, "advert envelope")
    if not isinstance(envelope, list) or len(envelope) != 3:
        raise _malformed("advert envelope must be [version, body, signature]")
    version, body, signature = envelope
    if isinstance(version, bool) or not isinstance(version, int):
        raise _malformed("advert version must be an integer")
    if version != ADVERT_VERSION:
        raise AdvertRejected(
            RejectReason.UNSUPPORTED_VERSION,
            f"advert version {version}, this node speaks {ADVERT_VERSION}",
        )
    if not isinstance(body, bytes) or not isinstance(signature, bytes):
        raise _malformed("advert body and signature must be bytes")
    if len(signature) != _SIGNATURE_LEN:
        raise AdvertRejected(RejectReason.BAD_SIGNATURE, "signature is not 64 bytes")
    advert = _advert_from_wire(_unpack(body, "advert body"))
    if encode_body(advert) != body:
        raise _malformed("advert body is not in canonical encoding")
    _check_peer_id(advert)
    try:
        VerifyKey(advert.peer_pubkey).verify(ADVERT_DOMAIN_TAG + body, signature)
    except BadSignatureError as e:
        raise AdvertRejected(
            RejectReason.BAD_SIGNATURE, f"signature does not verify for {advert.peer_id}"
        ) from e
    check_times(advert, now)
    return advert
