"""Fuzz targets: every decoder a peer (or a local HTTP client) can reach, as bytes → None.

The rule each target checks: on any input a decoder returns a valid object or raises the
typed error its module documents (the `allowed` tuple). Any other exception, or one input
taking longer than `MAX_INPUT_S`, is a finding. The same targets serve the short
hypothesis run in `make test` (tests/test_fuzz_*.py) and the long run (bench/fuzz.py).

Each target also names `seeds`: valid encodings that the mutators start from, so the
fuzzers reach past the first length or type check.

The job protocol's state machines (`core/job_protocol.py`) have their own target,
`job_state_machine`: scripted frame sequences with the driver's calls in between.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from meshnode.api.app import too_deep
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
from meshnode.core.crypto import Sealer, client_session, provider_session
from meshnode.core.directory import Directory
from meshnode.core.job_protocol import (
    ClientJob,
    ClientState,
    FreeWindow,
    JobRefused,
    LocalProtocolError,
    PaymentRequested,
    PromptReceived,
    ProtocolError,
    ProviderJob,
    ProviderState,
    VoucherReceived,
)
from meshnode.core.messages import (
    Accept,
    Busy,
    ErrorMsg,
    Message,
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
    # Subclasses of `allowed` that still break the rule (a machine blaming its driver).
    disallowed: tuple[type[BaseException], ...] = ()


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
        if isinstance(exc, target.disallowed):
            raise Finding(
                f"{target.name}: {type(exc).__name__}: {str(exc)[:200]}",
                signature_of(exc),
            ) from exc
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
    """The body as `api/app.read_json_body` decodes it: ValueError → its 400, and JSON
    nested past the parser's recursion limit → the 400 from `too_deep()`."""
    try:
        return json.loads(data)
    except RecursionError as exc:
        raise too_deep() from exc


def _api_parse(parse: Callable[[object, list[Any]], object], data: bytes) -> None:
    """As the app's completion endpoint: a parse that recurses too deep is `too_deep()`."""
    body = api_json(data)
    try:
        parse(body, CARDS)
    except RecursionError as exc:
        raise too_deep() from exc


def _api_chat(data: bytes) -> None:
    _api_parse(parse_chat_request, data)


def _api_completion(data: bytes) -> None:
    _api_parse(parse_completion_request, data)


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


# ------------------------------------------------------------- job state machines
#
# An input is a script: msgpack of {"p": frames to the provider, "c": frames to the
# client, "d": the driver's seed}. A frame is a wire map (parsed as the stream would) or
# a symbolic entry the harness completes with the session's keys, so that mutated bodies
# still pass the seal and reach the machines' ordering and counting rules:
#   ["open", overrides]          an Open from the fixed client key (fields overridable)
#   ["accept", overrides]        an Accept carrying the harness's provider sealer header
#   ["seal", body, final]        a body sealed in order on that direction's stream
# Each machine is driven alone, as jobs/provider.py and jobs/client.py drive it: the
# driver's local calls (accept/busy, payment_due, tokens, voucher_accepted, done, error;
# open, voucher, abort) are interleaved between frames where the state allows them,
# chosen by a random.Random("d").

# A script past this many frames per side adds no new orderings, only time.
MAX_SCRIPT_FRAMES = 64
SM_MAX_TOKENS = 64  # the client's max_tokens: small, so overruns are reachable
SM_JOB_ID = b"\x0a" * 16
SM_PROVIDER_KEY = PrivateKey(hashlib.sha256(b"fuzz provider job key").digest())
SM_CLIENT_KEY = PrivateKey(hashlib.sha256(b"fuzz client ephemeral").digest())
# Driver odds per step: rare enough that most scripts run to their end.
SM_ABORT_P = 0.03
SM_BUSY_P = 0.1
SM_VOUCHER_REJECT_P = 0.05
SM_FINISH_P = 0.1
# The provider's driver acts up to this many times between frames (generation runs on
# while the client is silent), and a few turns more after the client's last frame.
SM_MAX_DRIVER_STEPS = 6
SM_TAIL_STEPS = 4


class DriverBroke(AssertionError):
    """A machine broke its own documented contract (not an input error)."""


class _SmWindow:
    """A credit window in tokens: `limit` past what vouchers paid, `deposit` in all."""

    def __init__(self, limit: int, deposit: int) -> None:
        self.limit, self.deposit, self.paid, self.asked = limit, deposit, 0, 0

    def may_produce(self, upto: int) -> bool:
        return upto <= self.paid + self.limit

    def exhausted(self, upto: int) -> bool:
        return upto > self.deposit

    def ask(self, delivered: int, upto: int) -> int:
        self.asked = max(self.asked, upto - self.limit, delivered)
        return self.asked * 1000

    def settled(self, delivered: int) -> bool:
        return self.paid >= delivered


@dataclass(frozen=True)
class _SmChunk:
    text: str
    n_tokens: int


def _sm_script(data: bytes) -> tuple[list[Any], list[Any], int] | None:
    """The script in `data`, or None when it is not one (the decoders' targets own bytes
    that are not msgpack; here they would only test msgpack)."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return None
    if not isinstance(obj, dict):
        return None
    p, c, d = obj.get("p"), obj.get("c"), obj.get("d", 0)
    if not isinstance(p, list) or not isinstance(c, list):
        return None
    seed = d if isinstance(d, int) and not isinstance(d, bool) else 0
    return p[:MAX_SCRIPT_FRAMES], c[:MAX_SCRIPT_FRAMES], seed


class _Frames:
    """Turns script entries into messages for one direction, sealing in order."""

    def __init__(self, send_key: bytes, base: Callable[[bytes], dict[str, Any]]) -> None:
        self._sealer = Sealer(send_key, ad=SM_JOB_ID)
        self._base = base

    def message(self, entry: Any) -> Message | None:
        """The entry as the machine would get it, or None for one no stream could carry
        (not a map, a body the sealer refuses, a map parse_message rejects)."""
        if isinstance(entry, list) and entry and entry[0] in ("open", "accept"):
            wire = self._base(self._sealer.header)
            if len(entry) > 1 and isinstance(entry[1], dict):
                wire.update(entry[1])
            entry = wire
        elif isinstance(entry, list) and len(entry) == 3 and entry[0] == "seal":
            if not isinstance(entry[1], dict):
                return None
            try:
                entry = Sealed(self._sealer.seal(entry[1], final=entry[2] is True)).to_wire()
            except Exception:  # the harness's own sealer: too large, unpackable, closed
                return None
        if not isinstance(entry, dict):
            return None
        try:
            return parse_message(entry)
        except WireError:
            return None  # the stream ends here; job_messages fuzzes this path


def _closed(job: ProviderJob | ClientJob) -> bool:
    closed = ProviderState.CLOSED if isinstance(job, ProviderJob) else ClientState.CLOSED
    return job.state is closed


def _receive(job: ProviderJob | ClientJob, msg: Any) -> object | None:
    """The job's event for ``msg``; None when the job refused it, which must close it.
    A closed job that takes a frame, or a refusal that leaves it open, is a bug."""
    closed_before = _closed(job)
    try:
        event: object = job.receive_frame(msg)
    except LocalProtocolError:
        raise
    except ProtocolError as exc:
        if not _closed(job):
            raise DriverBroke(
                f"{type(job).__name__} left open ({job.state}) after {exc!r}") from None
        return None
    if closed_before:
        raise DriverBroke(f"a closed {type(job).__name__} took {type(msg).__name__}: {event!r}")
    return event


def _sm_provider(frames: list[Any], rng: random.Random) -> None:
    job = ProviderJob(SM_PROVIDER_KEY, MODEL_ID)
    send_key = client_session(SM_CLIENT_KEY, bytes(SM_PROVIDER_KEY.public_key)).send

    def open_wire(header: bytes) -> dict[str, Any]:
        return Open(job_id=SM_JOB_ID, model_id=MODEL_ID, params={"seed": 1}, max_tokens=32,
                    channel_id=None, client_pub=bytes(SM_CLIENT_KEY.public_key),
                    header=header, auth=None, channel_key=None).to_wire()

    source = _Frames(send_key, open_wire)
    window = _SmWindow(limit=rng.randrange(1, 8), deposit=rng.choice((4, 16, 1000)))

    def step() -> None:
        """The driver's turn: generate, ask for payment, settle and finish."""
        for _ in range(rng.randrange(SM_MAX_DRIVER_STEPS)):
            if job.state is not ProviderState.GENERATING:
                return
            r = rng.random()
            if r < SM_ABORT_P:
                job.error("internal", "driver gave up")
                return
            try:
                if r < SM_FINISH_P:  # try to finish: Done only once everything is paid
                    if job.payment_due(None) is None:
                        job.done(rng.choice(("stop", "length")), window.paid * 1000)
                    return
                if job.payment_pending:
                    return  # waiting for the voucher
                pending = [_SmChunk(rng.choice(("a", "é", "字", "ab ")), rng.choice((1, 1, 2)))
                           for _ in range(rng.randrange(1, 4))]
                if job.payment_due(job.delivered + pending[0].n_tokens) is not None:
                    return  # the NeedPayment goes out; wait for a voucher
                job.tokens(pending)
            except JobRefused as exc:  # channel_exhausted: the driver sends its Error
                job.error(exc.code, str(exc))
                return

    for entry in frames:
        msg = source.message(entry)
        if msg is None:
            continue
        event = _receive(job, msg)
        if event is None:
            continue
        if isinstance(event, PromptReceived):
            if rng.random() < SM_BUSY_P:
                job.busy(1.0)
            else:
                priced = rng.random() < 0.7
                job.accept(window if priced else FreeWindow(), rng.randrange(0, 50),
                           rng.randrange(0, 10**6) if priced else None)
        elif isinstance(event, VoucherReceived):
            if rng.random() < SM_VOUCHER_REJECT_P:
                job.error("bad_voucher", "voucher rejected")
            else:
                window.paid = max(window.paid, window.asked)
                job.voucher_accepted()
        step()
    for _ in range(SM_TAIL_STEPS):  # the engine runs on after the client's last frame
        step()


def _sm_client(frames: list[Any], rng: random.Random) -> None:
    job = ClientJob(bytes(SM_PROVIDER_KEY.public_key), MODEL_ID, "Hello", SM_MAX_TOKENS,
                    {"seed": 1}, job_id=SM_JOB_ID, ephemeral=SM_CLIENT_KEY)
    send_key = provider_session(SM_PROVIDER_KEY, bytes(SM_CLIENT_KEY.public_key)).send

    def accept_wire(header: bytes) -> dict[str, Any]:
        return Accept(header=header, prompt_tokens=3, owed_before=0).to_wire()

    source = _Frames(send_key, accept_wire)
    if rng.random() < 0.5:
        job.open(None, None, None)
    else:
        job.open(7, b"\x04" * 64, b"\x05" * 32)
    for entry in frames:
        msg = source.message(entry)
        if msg is None:
            continue
        if job.state is not ClientState.CLOSED and rng.random() < SM_ABORT_P:
            job.abort("cancelled", "client gave up")
        event = _receive(job, msg)
        if event is None:
            continue
        if job.received > SM_MAX_TOKENS:
            raise DriverBroke(f"client took {job.received} tokens past max {SM_MAX_TOKENS}")
        if isinstance(event, PaymentRequested):
            if rng.random() < SM_ABORT_P:
                job.abort("unpaid", "no voucher")
            else:
                job.voucher(b"\x08" * 100)


def _job_state_machines(data: bytes) -> None:
    script = _sm_script(data)
    if script is None:
        return
    to_provider, to_client, seed = script
    _sm_provider(to_provider, random.Random(seed))
    _sm_client(to_client, random.Random(seed + 1))


def _tokens(text: str, n: int, total: int) -> list[Any]:
    return ["seal", {"k": "tokens", "text": text, "n": n, "total": total}, False]


def _done(completion: int, cost: int = 0, reason: str = "stop") -> list[Any]:
    return ["seal", Usage(3, completion, reason, cost).to_body(), True]


def _seed_job_scripts() -> list[bytes]:
    """Valid conversations, one per path through the protocol."""
    prompt = ["seal", {"k": "prompt", "prompt": "Hello"}, False]
    voucher = VoucherMsg(boc=b"\x08" * 100).to_wire()
    abort = ErrorMsg(code="cancelled", msg="bye").to_wire()
    free_c = [["accept", {}], _tokens("Hel", 1, 1), _tokens("lo", 1, 2), _done(2)]
    priced_c = [
        ["accept", {"ptok": 3, "owed": 100}],
        NeedPayment(owed=2000, delivered=0).to_wire(),
        _tokens("ab", 2, 2),
        NeedPayment(owed=4000, delivered=2).to_wire(),
        _tokens("cd", 2, 4),
        NeedPayment(owed=4000, delivered=4).to_wire(),
        _done(4, 4000, "length"),
    ]
    scripts = [
        {"p": [["open", {}], prompt], "c": free_c, "d": 1},
        {"p": [["open", {"chan": 7}], prompt, voucher, voucher, voucher], "c": priced_c, "d": 2},
        {"p": [["open", {}], prompt, voucher, abort], "c": [Busy(1.5).to_wire()], "d": 3},
        {"p": [["open", {}], prompt, abort],
         "c": [["accept", {}], _tokens("x", 1, 1), ErrorMsg("internal", "oops").to_wire()],
         "d": 4},
    ]
    return [pack(s) for s in scripts]


def job_state_machine_target() -> Target:
    """The job protocol's sans-io state machines (`core/job_protocol.py`): scripted frame
    sequences into ProviderJob and ClientJob with the driver's calls in between. The rule:
    only the typed `ProtocolError` family; `LocalProtocolError` means the machine blamed
    a driver that kept to its documented order (or the harness broke it: either way, a
    finding); a machine that stays open after raising or takes frames once closed breaks
    its contract."""
    return Target("job_state_machine", _job_state_machines, (ProtocolError,),
                  _seed_job_scripts, disallowed=(LocalProtocolError,))


TARGETS["job_state_machine"] = job_state_machine_target()
"""Targets whose inputs are scripts, not wire bytes: random bytes and byte mutants mostly
do not decode, so the short run fuzzes them through their structured mutants."""
SCRIPT_TARGETS = frozenset({"job_state_machine"})


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
    if target.name in SCRIPT_TARGETS:
        return mutate_script(seed, rng)
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


def mutate_script(seed: bytes, rng: random.Random) -> bytes:
    """A job script with one to three edits to its frame lists: a frame dropped,
    duplicated, moved, altered (a field replaced, dropped or added, a body changed before
    it is sealed), the list shuffled or cut, a random or wrong-direction frame inserted,
    or a new driver seed."""
    script = _sm_script(seed)
    if script is None:
        return seed
    sides = {"p": list(script[0]), "c": list(script[1])}
    d = script[2]
    for _ in range(rng.randrange(1, 4)):
        side = rng.choice("pc")
        frames = sides[side]
        op = rng.randrange(9)
        i = rng.randrange(len(frames)) if frames else 0
        if op == 0 and frames:
            del frames[i]
        elif op == 1 and frames:
            frames.insert(rng.randrange(len(frames) + 1), frames[i])
        elif op == 2 and frames:
            frames.insert(rng.randrange(len(frames) + 1), frames.pop(i))
        elif op == 3:
            rng.shuffle(frames)
        elif op == 4 and frames:
            frames[i] = mutate_structure(frames[i], rng)
        elif op == 5:
            other = sides["c" if side == "p" else "p"]
            pool: list[Any] = [*job_messages(), *other] or job_messages()
            new = rng.choice(pool) if rng.random() < 0.8 else random_value(rng)
            frames.insert(rng.randrange(len(frames) + 1), new)
        elif op == 6 and frames:
            del frames[i:]
        elif op == 7:
            d = rng.randrange(2**32)
        else:  # a frame sealed from a random body: authentic, but any shape
            body = random_value(rng) if rng.random() < 0.3 else mutate_structure(
                rng.choice(job_bodies()), rng)
            frames.insert(rng.randrange(len(frames) + 1), ["seal", body, rng.random() < 0.3])
    return pack({"p": sides["p"], "c": sides["c"], "d": d})


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
    if mode == 0 and target.name in SCRIPT_TARGETS and seeds:
        # Random bytes are rarely a script: a heavily edited script instead.
        return mutate_script(mutate_script(rng.choice(seeds), rng), rng)
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


# Empty: every finding pinned so far has been fixed by its owner (issue 13). A new one
# goes here with its owner, signature and minimal reproducer.
KNOWN_BUGS: tuple[KnownBug, ...] = ()


def known_signatures(target: str) -> frozenset[str]:
    return frozenset(b.signature for b in KNOWN_BUGS if target in b.targets)
