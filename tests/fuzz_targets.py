"""Fuzz targets: every decoder a peer (or a local HTTP client) can reach, as bytes → None.

The rule each target checks: on any input a decoder returns a valid object or raises the
typed error its module documents (the `allowed` tuple). Any other exception, or one input
taking longer than `MAX_INPUT_S`, is a finding. The same targets serve the short
hypothesis run in `make test` (tests/test_fuzz_*.py) and the long run (bench/fuzz.py).

Each target also names `seeds`: valid encodings that the mutators start from, so the
fuzzers reach past the first length or type check.

Not covered here yet: the job-protocol state machine (`core/job_protocol.py`, being
written); see `job_state_machine_target` below, the place to add it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import msgpack
from nacl.signing import SigningKey

from meshnode.api.backend import ModelCard
from meshnode.api.errors import ApiError
from meshnode.api.openai_request import parse_chat_request, parse_completion_request
from meshnode.attest.collateral import CollateralError, load_collateral_json
from meshnode.attest.dev import DevEvidenceProducer
from meshnode.attest.evidence import Evidence, EvidenceError
from meshnode.attest.verifier import AttestationError, EvidenceVerifier, verify_tdx_quote
from meshnode.core import runner_wire
from meshnode.core.advert import (
    Advert,
    AdvertRejected,
    Capacity,
    Load,
    ModelOffer,
    TonPayee,
    decode_and_verify,
    encode_signed,
)
from meshnode.core.attest_binding import (
    BindingInputs,
    epoch_at,
    gpu_evidence_hash,
    report_data_for,
)
from meshnode.core.attest_policy import AttestationPolicy
from meshnode.core.directory import Directory
from meshnode.core.messages import (
    Accept,
    Busy,
    ErrorMsg,
    NeedPayment,
    Open,
    Sealed,
    Usage,
    VoucherMsg,
    check_done_body,
    check_prompt_body,
    check_tokens_body,
    parse_message,
)
from meshnode.core.peerid import peer_id_from_ed25519
from meshnode.core.voucher import VoucherError, VoucherState, parse_voucher, sign_voucher
from meshnode.core.wire import FrameDecoder, WireError, decode_body, encode_frame
from meshnode.pay.channel.protocol import (
    Announce,
    Announced,
    CloseRequest,
    CloseSigned,
    Refusal,
    parse_reply,
    parse_request,
)

# One input of at most a few KiB must decode in well under a second even on a loaded
# 2-core CI box; a decoder that takes longer is a denial-of-service lever.
MAX_INPUT_S = 1.0
# A typed error's text goes to logs and to the peer: it may quote a clipped piece of the
# input, never all of it (the freeze came from 64 KiB names in error messages).
MAX_ERROR_TEXT_CHARS = 2048

NOW = 1_700_000_000.0  # fixed clock for adverts: a target's verdict must not depend on time
SEED = bytes(range(32))
MODEL_ID = hashlib.sha256(b"fuzz model").hexdigest()
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tdx"


class Finding(AssertionError):
    """A target broke the rule: an untyped exception, a typed error whose text quotes the
    input unbounded, or an input over MAX_INPUT_S. `signature` names the bug without line
    numbers (kind, exception, file and function that raised), so it survives edits."""

    def __init__(self, message: str, signature: str) -> None:
        super().__init__(message)
        self.signature = signature


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], object]
    allowed: tuple[type[BaseException], ...]
    seeds: Callable[[], list[bytes]]
    # Peer-reachable decoders must clip quoted input; the local HTTP API echoes what its
    # own user sent (as OpenAI does), so its errors are not held to the bound.
    bound_text: bool = True


def _raised_at(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.name}"


def signature_of(exc: BaseException) -> str:
    return f"{type(exc).__name__}@{_raised_at(exc)}"


def _too_long(exc: BaseException) -> bool:
    return len(str(exc)) > MAX_ERROR_TEXT_CHARS


def check(target: Target, data: bytes) -> None:
    """Run one input; raise Finding (chained to the cause) if the rule is broken."""
    start = time.perf_counter()
    try:
        target.run(data)
    except target.allowed as exc:
        if target.bound_text and _too_long(exc):
            raise Finding(
                f"{target.name}: {type(exc).__name__} text of {len(str(exc))} chars "
                f"(limit {MAX_ERROR_TEXT_CHARS}) quotes the input unbounded: {str(exc)[:80]!r}",
                "text:" + signature_of(exc),
            ) from exc
    except Exception as exc:
        raise Finding(
            f"{target.name}: {type(exc).__name__} on input {data[:64]!r}"
            f"{'...' if len(data) > 64 else ''} ({len(data)} bytes)",
            signature_of(exc),
        ) from exc
    elapsed = time.perf_counter() - start
    if elapsed > MAX_INPUT_S:
        raise Finding(f"{target.name}: {elapsed:.2f} s on one {len(data)}-byte input", "slow")


def pack(obj: object) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


# ------------------------------------------------------------------ frames and messages


def _frames(data: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(data)
    dec.eof()


def _job_message(data: bytes) -> None:
    parse_message(decode_body(data))


def _job_bodies(data: bytes) -> None:
    body = decode_body(data)
    for check_body in (check_prompt_body, check_tokens_body, check_done_body):
        try:
            check_body(body)
        except WireError as exc:
            if _too_long(exc):
                raise


def _job_stream(data: bytes) -> None:
    """A whole stream as one peer sends it: frames in, each parsed in order."""
    dec = FrameDecoder()
    for frame in dec.feed(data):
        parse_message(frame)
    dec.eof()


def job_messages() -> list[dict[str, Any]]:
    """One valid wire map of every job-protocol message type."""
    msgs = [
        Open(
            job_id=b"\x01" * 16,
            model_id=MODEL_ID,
            params={"temperature": 0.0, "seed": 1},
            max_tokens=32,
            channel_id=7,
            client_pub=b"\x02" * 32,
            header=b"\x03" * 24,
            auth=b"\x04" * 64,
            channel_key=b"\x05" * 32,
        ),
        Sealed(ciphertext=b"\x06" * 40),
        Accept(header=b"\x07" * 24, prompt_tokens=5, owed_before=100),
        VoucherMsg(boc=b"\x08" * 100),
        NeedPayment(owed=10, delivered=3),
        Busy(retry_after=1.5),
        ErrorMsg(code="busy", msg="try later"),
    ]
    return [m.to_wire() for m in msgs]


def job_bodies() -> list[dict[str, Any]]:
    return [
        {"k": "prompt", "prompt": "Hello"},
        {"k": "tokens", "text": "lo", "n": 1, "total": 3},
        Usage(prompt_tokens=3, completion_tokens=5, finish_reason="stop").to_body(),
    ]


def _seed_frames() -> list[bytes]:
    return [encode_frame(m) for m in job_messages()] + [b"".join(map(encode_frame, job_messages()))]


# --------------------------------------------------------------------------- adverts


def make_advert(**changes: Any) -> Advert:
    key = SigningKey(SEED)
    pubkey = bytes(key.verify_key)
    advert = Advert(
        peer_id=peer_id_from_ed25519(pubkey),
        peer_pubkey=pubkey,
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        models=(
            ModelOffer(
                id=MODEL_ID,
                name="tiny",
                quant="F32",
                ctx=512,
                price_prompt_per_1k=1_000,
                price_completion_per_1k=3_000,
            ),
        ),
        capacity=Capacity(slots=2, tokens_per_s=42.5),
        load=Load(busy_slots=1, queue_len=0),
        job_pubkey=b"\x07" * 32,
        attestation={"kind": "dev", "statement": b"\x01\x02", "epoch": 3},
        ton=TonPayee(channel_pubkey=b"\x09" * 32, wallet_address="0:" + "ab" * 32),
        seq=1,
        issued_at=NOW,
        expires_at=NOW + 300,
    )
    return dataclasses.replace(advert, **changes)


def signed_envelope(body: bytes, version: int = 1) -> bytes:
    """An advert envelope around any body, signed with SEED (reaches past the signature)."""
    from meshnode.core.advert import sign_body

    return pack([version, body, sign_body(body, SEED)])


def _advert(data: bytes) -> None:
    decode_and_verify(data, NOW)


def _seed_adverts() -> list[bytes]:
    return [encode_signed(make_advert(), SEED), encode_signed(make_advert(ton=None), SEED)]


def _snapshot(data: bytes) -> None:
    """A directory snapshot frame (p2p/directory_sync): its items go into a Directory,
    whose insert must never raise on bad input."""
    frame = decode_body(data)
    items = frame.get("items")
    if frame.get("t") != "adverts" or not isinstance(items, list):
        return
    directory = Directory(max_entries=4)
    for item in items:
        if isinstance(item, bytes):
            directory.insert(item, NOW)
    directory.peers(NOW)
    directory.models(NOW)


def _seed_snapshots() -> list[bytes]:
    a, b = _seed_adverts()
    newer = encode_signed(make_advert(seq=2), SEED)
    return [pack({"t": "adverts", "items": [a, b, newer, b"junk"]})]


# --------------------------------------------------------------------- vouchers, channel


def _voucher(data: bytes) -> None:
    v = parse_voucher(data)
    v.verify(bytes(SigningKey(SEED).verify_key))


def _seed_vouchers() -> list[bytes]:
    states = [VoucherState(channel_id=7, seqno=1, sent=1000), VoucherState(1, 0, 0)]
    return [sign_voucher(s, SEED).to_boc() for s in states]


def _channel(data: bytes) -> None:
    d = decode_body(data)
    for parse in (parse_request, lambda m: parse_reply(m, Announced),
                  lambda m: parse_reply(m, CloseSigned)):
        try:
            parse(d)
        except WireError as exc:
            if _too_long(exc):
                raise


def _seed_channel() -> list[bytes]:
    msgs = [
        Announce(7, b"\x01" * 32, "0:" + "ab" * 32, 10, 0, 10, 0).to_wire(),
        Announced(deposit=5, state_b=b"\x02" * 100).to_wire(),
        CloseRequest(7, b"\x01" * 32, b"\x03" * 100, b"\x04" * 64).to_wire(),
        CloseSigned(signature_b=b"\x05" * 64).to_wire(),
        Refusal(code="unknown", msg="no").to_wire(),
    ]
    return [pack(m) for m in msgs]


# ---------------------------------------------------------------------------- runner


def _runner(data: bytes) -> None:
    runner_wire.FrameDecoder().feed(data)


def _seed_runner() -> list[bytes]:
    msgs: list[dict[str, Any]] = [
        {"t": "pong", "n": 1},
        {"t": "count", "id": 1, "n": 3},
        {"t": "err", "id": 1, "kind": "engine", "msg": "x"},
        {"t": "fatal", "msg": "gone"},
    ]
    return [runner_wire.encode(m) for m in msgs]


# ------------------------------------------------------------------------ attestation

POLICY = AttestationPolicy(
    allowed_tcb_statuses=frozenset({"UpToDate"}),
    measurements=(),
    allow_dynamic_platform=True,
    allow_cached_keys=True,
    allow_smt=True,
    allow_dev=True,
)
JOB_PUB = b"\x07" * 32


def fixtures_present() -> bool:
    return (FIXTURES / "tdx_quote").is_file()


@cache
def _tdx_fixture() -> tuple[bytes, str, int]:
    """(quote, collateral JSON, a unix time inside the collateral's window)."""
    from datetime import datetime

    text = (FIXTURES / "tdx_quote_collateral.json").read_text()
    issued = json.loads(json.loads(text)["tcb_info"])["issueDate"]
    at = datetime.fromisoformat(issued.replace("Z", "+00:00")).timestamp() + 3600
    return (FIXTURES / "tdx_quote").read_bytes(), text, int(at)


@cache
def _dcap_policy(now: int) -> Any:
    from meshnode.attest.verifier import dcap_policy

    return dcap_policy(POLICY, now)


def _quote(data: bytes) -> None:
    _, text, at = _tdx_fixture()
    verify_tdx_quote(data, load_collateral_json(text), at, _dcap_policy(at), None)


def _collateral(data: bytes) -> None:
    quote, _, at = _tdx_fixture()
    collateral = load_collateral_json(data.decode("utf-8", "replace"))
    verify_tdx_quote(quote, collateral, at, _dcap_policy(at), None)


def _seed_quotes() -> list[bytes]:
    return [_tdx_fixture()[0]] if fixtures_present() else [b"\x04\x00\x02\x00"]


def _seed_collateral() -> list[bytes]:
    return [_tdx_fixture()[1].encode()] if fixtures_present() else [b"{}"]


def _evidence(data: bytes) -> None:
    """Evidence as it arrives in an advert: map → Evidence → verdict (never raises)."""
    try:  # the advert decoder hands evidence over as a map; other bytes never reach here
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return
    if isinstance(obj, dict) and not all(isinstance(k, str) for k in obj):
        return  # the advert decoder lets only string keys into evidence maps
    evidence = Evidence.from_dict(obj)
    key = SigningKey(SEED)
    collateral = load_collateral_json(_tdx_fixture()[1]) if fixtures_present() else None
    at = _tdx_fixture()[2] if fixtures_present() else int(NOW)
    EvidenceVerifier(POLICY, allow_insecure=True).verify(
        evidence,
        peer_id="p",
        job_pub=JOB_PUB,
        peer_pub=bytes(key.verify_key),
        now=float(at),
        collateral=collateral,
    )


def _seed_evidence() -> list[bytes]:
    key = SigningKey(SEED)
    inputs = BindingInputs(JOB_PUB, bytes(key.verify_key), gpu_evidence_hash(None))
    rd = report_data_for(inputs, epoch_at(NOW))
    dev = DevEvidenceProducer(key).produce(rd)
    seeds = [pack(dev.to_dict())]
    if fixtures_present():
        seeds.append(pack(Evidence(kind="tdx", blob=_tdx_fixture()[0]).to_dict()))
    return seeds


# ------------------------------------------------------------------------------- API

CARDS = [
    ModelCard(id=MODEL_ID, name="tiny", quant="F32", ctx=512, providers=1,
              verified_providers=1, price_prompt_per_1k=0, price_completion_per_1k=0,
              chat_format="chatml")
]


def api_json(data: bytes) -> Any:
    """The body as `api/app.read_json_body` decodes it (ValueError → its 400)."""
    return json.loads(data)


def _api_chat(data: bytes) -> None:
    parse_chat_request(api_json(data), CARDS)


def _api_completion(data: bytes) -> None:
    parse_completion_request(api_json(data), CARDS)


def _seed_api_chat() -> list[bytes]:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "temperature": 0.5, "stop": ["\n"], "stream": True,
            "stream_options": {"include_usage": True}, "logit_bias": {"5": 1.0}}
    return [json.dumps(body).encode()]


def _seed_api_completion() -> list[bytes]:
    body = {"model": MODEL_ID, "prompt": "Once", "max_tokens": 4, "seed": 3, "top_k": 4}
    return [json.dumps(body).encode()]


# The API's JSON layer: json.loads raises ValueError (JSONDecodeError, UnicodeDecodeError).
_API_ALLOWED = (ApiError, ValueError)

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("frames", _frames, (WireError,), _seed_frames),
        Target("job_messages", _job_message, (WireError,),
               lambda: [pack(m) for m in job_messages()]),
        Target("job_bodies", _job_bodies, (WireError,), lambda: [pack(b) for b in job_bodies()]),
        Target("job_stream", _job_stream, (WireError,), _seed_frames),
        Target("adverts", _advert, (AdvertRejected,), _seed_adverts),
        Target("directory_snapshot", _snapshot, (WireError,), _seed_snapshots),
        Target("vouchers", _voucher, (VoucherError,), _seed_vouchers),
        Target("channel_messages", _channel, (WireError,), _seed_channel),
        Target("runner_wire", _runner, (runner_wire.RunnerProtocolError,), _seed_runner),
        Target("evidence", _evidence, (EvidenceError,), _seed_evidence),
        Target("tdx_quote", _quote, (AttestationError,), _seed_quotes),
        Target("tdx_collateral", _collateral, (CollateralError, AttestationError),
               _seed_collateral),
        Target("api_chat", _api_chat, _API_ALLOWED, _seed_api_chat, bound_text=False),
        Target("api_completion", _api_completion, _API_ALLOWED, _seed_api_completion,
               bound_text=False),
    )
}
"""Targets that need the real TDX fixtures (skipped without them)."""
NEEDS_FIXTURES = frozenset({"tdx_quote", "tdx_collateral"})


def job_state_machine_target() -> Target | None:
    """The job protocol's sans-io state machines (`core/job_protocol.py`: ProviderJob,
    ClientJob), once they exist. Add the target here: feed fuzzed frame sequences as
    events into both machines; every event must yield frames/events or a typed protocol
    error, never an untyped exception. Until then job ordering is fuzzed through the
    decoders only (`job_stream`)."""
    if importlib.util.find_spec("meshnode.core.job_protocol") is None:
        return None
    return None  # TODO(jobs): wire the state machine in once its API settles


# -------------------------------------------------------------------------- mutators

# Inputs stay small: decoders check sizes first, and small inputs explore more per second.
MAX_MUTANT_BYTES = 8192
# Interesting integers at type boundaries (msgpack int widths, signed/unsigned edges).
_EDGE_INTS = (0, 1, -1, 127, 128, 255, 256, 65535, 65536, 2**31, 2**32, 2**63 - 1, 2**63,
              2**64 - 1, -(2**63), 16, 24, 32, 64, 1 << 20)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """An arbitrary msgpack-able value, nesting bounded so packing stays cheap."""
    kind = rng.randrange(10 if depth < 4 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice((True, False))
    if kind == 2:
        return rng.choice(_EDGE_INTS) if rng.random() < 0.5 else rng.randint(-(2**63), 2**64 - 1)
    if kind == 3:
        return rng.choice((0.0, -1.0, 1e308, float("inf"), float("nan"), rng.random()))
    if kind == 4:
        return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0, 0x2FFF))))
                       for _ in range(rng.choice((0, 1, 5, 64, 300, 5000))))
    if kind in (5, 6):
        return rng.randbytes(rng.choice((0, 1, 16, 24, 32, 64, 100, 300)))
    if kind in (7, 8):
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys: list[Any] = ["t", "k", "v", "id", "n", "x", 0, 1, -1, "items", "kind", "blob"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def mutate_structure(obj: Any, rng: random.Random) -> Any:
    """A copy of a decoded map/list with one field replaced, dropped or added."""
    if isinstance(obj, dict) and obj:
        out = dict(obj)
        key = rng.choice(list(out))
        op = rng.randrange(4)
        if op == 0:
            del out[key]
        elif op == 1:
            out[rng.choice((key + "_" if isinstance(key, str) else 7, 3, "zz"))] = random_value(rng)
        elif op == 2 and isinstance(out[key], dict | list):
            out[key] = mutate_structure(out[key], rng)
        else:
            out[key] = random_value(rng)
        return out
    if isinstance(obj, list) and obj:
        out_l = list(obj)
        i = rng.randrange(len(out_l))
        if isinstance(out_l[i], dict | list) and rng.random() < 0.5:
            out_l[i] = mutate_structure(out_l[i], rng)
        else:
            out_l[i] = random_value(rng)
        return out_l
    return random_value(rng)


def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """A few byte-level edits: flips, boundary bytes, inserts, deletes, duplicated runs."""
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[min(pos, len(buf) - 1)] = rng.choice((0, 0x7F, 0x80, 0xFF, 0xC1, 0xDD, 0xDF))
        elif op == 2:
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 9))
        elif op == 3 and buf:
            del buf[pos : pos + rng.randrange(1, 17)]
        elif op == 4 and buf:
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randrange(1, 64)]
        else:
            del buf[pos:]
    return bytes(buf[:MAX_MUTANT_BYTES])


def structured_mutant(target: Target, seed: bytes, rng: random.Random) -> bytes:
    """`seed` decoded, mutated as a structure and re-encoded the way the target reads it
    (re-signed for adverts, so mutants reach the checks behind the signature)."""
    if target.name in ("frames", "job_stream"):
        frames = FrameDecoder().feed(seed)
        if not frames:
            return seed
        i = rng.randrange(len(frames))
        frames[i] = mutate_structure(frames[i], rng)
        if rng.random() < 0.3:  # reorder: job-protocol ordering through the decoders
            rng.shuffle(frames)
        return b"".join(_raw_frame(pack(f)) for f in frames)
    if target.name == "runner_wire":
        body = pack(mutate_structure(msgpack.unpackb(seed[4:], raw=False), rng))
        return len(body).to_bytes(4, "big") + body
    if target.name == "adverts":
        _, body, _ = msgpack.unpackb(seed, raw=False)
        return signed_envelope(pack(mutate_structure(msgpack.unpackb(body, raw=False), rng)))
    if target.name == "directory_snapshot":
        snap = msgpack.unpackb(seed, raw=False)
        items = list(snap["items"])
        i = rng.randrange(len(items))
        items[i] = structured_mutant(TARGETS["adverts"], _seed_adverts()[0], rng)
        return pack({"t": "adverts", "items": items})
    if target.name in ("tdx_quote", "vouchers"):
        return mutate_bytes(seed, rng)
    if target.name == "tdx_collateral":
        doc = json.loads(seed)
        key = rng.choice(list(doc))
        val = doc[key]
        if isinstance(val, str) and rng.random() < 0.7:
            if val.startswith("{"):  # tcb_info / qe_identity: JSON inside JSON
                inner = json.loads(val)
                doc[key] = json.dumps(_json_safe(mutate_structure(inner, rng)))
            else:
                doc[key] = mutate_bytes(val.encode(), rng).decode("utf-8", "replace")
        else:
            doc[key] = _json_safe(random_value(rng))
        return json.dumps(doc).encode()
    if target.name.startswith("api_"):
        return json.dumps(_json_safe(mutate_structure(json.loads(seed), rng))).encode()
    return pack(mutate_structure(msgpack.unpackb(seed, raw=False, strict_map_key=False), rng))


def _raw_frame(body: bytes) -> bytes:
    from meshnode.core.wire import encode_uvarint

    return encode_uvarint(len(body)) + body


def _json_safe(value: Any) -> Any:
    """random_value output as JSON can carry it (bytes → str, non-str keys → str)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, float) and value != value:
        return 0.5
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return value


def generate(target: Target, seeds: list[bytes], rng: random.Random) -> bytes:
    """One input: a third each raw random bytes, byte mutants and structured mutants."""
    mode = rng.randrange(3)
    if mode == 0 or not seeds:
        return rng.randbytes(rng.choice((0, 1, 2, 4, 8, 32, 256, 2048)))
    seed = rng.choice(seeds)
    if mode == 1:
        return mutate_bytes(seed, rng)
    return structured_mutant(target, seed, rng)


# ------------------------------------------------------------------------ known bugs


@dataclass(frozen=True)
class KnownBug:
    """A finding in code this harness does not own, pinned by a minimal reproducer.

    The short fuzz tests tolerate `signature` on `targets` (so they keep looking for new
    bugs), and tests/test_fuzz_known_bugs.py runs `reproducer` as a strict xfail: when
    the owner fixes the bug that test passes unexpectedly, and the entry is deleted.
    """

    name: str
    owner: str
    summary: str
    signature: str
    targets: frozenset[str]
    reproducer: bytes


_MIXED_KEYS_JOB = pack({"t": "busy", "retry_after": 1.0, "x": 0, 0: 0})
_MIXED_KEYS_CHANNEL = pack({"t": "announced", "deposit": 5, "state_b": b"", "x": 0, 0: 0})
_LONG = "x" * 65536  # a 64 KiB name, as in the freeze

KNOWN_BUGS: tuple[KnownBug, ...] = (
    KnownBug(
        "job-message-mixed-key-types",
        "core/messages.py",
        "parse_message sorts the extra keys of a frame for its error text; a frame with "
        "both int and str extra keys raises TypeError instead of SchemaError",
        "TypeError@messages.py:parse_message",
        frozenset({"job_messages", "job_stream"}),
        _MIXED_KEYS_JOB,
    ),
    KnownBug(
        "job-message-unknown-type-unbounded-text",
        "core/messages.py",
        "UnknownMessage quotes the frame's `t` in full (64 KiB in, 64 KiB of error text out)",
        "text:UnknownMessage@messages.py:parse_message",
        frozenset({"job_messages", "job_stream"}),
        pack({"t": _LONG}),
    ),
    KnownBug(
        "job-message-extra-keys-unbounded-text",
        "core/messages.py",
        "SchemaError lists a frame's unexpected keys in full (a 64 KiB key name is echoed)",
        "text:SchemaError@messages.py:parse_message",
        frozenset({"job_messages", "job_stream"}),
        pack({"t": "busy", "retry_after": 1.0, _LONG: 0}),
    ),
    KnownBug(
        "channel-message-mixed-key-types",
        "pay/channel/protocol.py",
        "_keys sorts a frame's keys for its error text; int and str keys together raise "
        "TypeError instead of ChannelProtocolError",
        "TypeError@protocol.py:_keys",
        frozenset({"channel_messages"}),
        _MIXED_KEYS_CHANNEL,
    ),
    KnownBug(
        "channel-message-keys-unbounded-text",
        "pay/channel/protocol.py",
        "_keys quotes every key of a bad frame in its error (a 64 KiB key is echoed)",
        "text:ChannelProtocolError@protocol.py:_require",
        frozenset({"channel_messages"}),
        pack({"t": "announced", _LONG: 0}),
    ),
    KnownBug(
        "channel-request-unknown-type-unbounded-text",
        "pay/channel/protocol.py",
        "parse_request quotes an unknown `t` in full",
        "text:ChannelProtocolError@protocol.py:parse_request",
        frozenset({"channel_messages"}),
        pack({"t": _LONG}),
    ),
    KnownBug(
        "evidence-version-unbounded-text",
        "attest/evidence.py",
        "Evidence.from_dict quotes a bad `v` in full (up to the advert's 48 KiB of evidence)",
        "text:EvidenceError@evidence.py:from_dict",
        frozenset({"evidence"}),
        pack({"v": "x" * 40_000}),
    ),
    KnownBug(
        "evidence-kind-unbounded-text",
        "attest/evidence.py",
        "Evidence quotes an unknown `kind` in full",
        "text:EvidenceError@evidence.py:__post_init__",
        frozenset({"evidence"}),
        pack({"v": 1, "kind": "x" * 40_000, "blob": b"a"}),
    ),
    KnownBug(
        "api-chat-role-unhashable",
        "api/chat_format.py",
        'a chat message whose "role" is an object raises TypeError (unhashable) in '
        "parse_messages: the API answers 500 instead of 400",
        "TypeError@chat_format.py:parse_messages",
        frozenset({"api_chat"}),
        b'{"model": "tiny", "messages": [{"role": {}, "content": "hi"}]}',
    ),
    KnownBug(
        "api-nested-json-recursion",
        "api/app.py",
        "read_json_body catches ValueError only; 100k nested arrays raise RecursionError "
        "from json.loads: the API answers 500 instead of 400",
        "RecursionError@decoder.py:raw_decode",
        frozenset({"api_chat", "api_completion"}),
        b"[" * 100_000,
    ),
)


def known_signatures(target: str) -> frozenset[str]:
    return frozenset(b.signature for b in KNOWN_BUGS if target in b.targets)
