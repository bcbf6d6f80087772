"""Capability adverts: peer ids, canonical signed encoding, and every receiver check."""

from __future__ import annotations

import dataclasses
import hashlib

import msgpack
import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from nacl.signing import SigningKey

from meshnode.core.advert import (
    ADVERT_DOMAIN_TAG,
    ADVERT_VERSION,
    MAX_ADDRS,
    MAX_ADVERT_BYTES,
    MAX_ADVERT_LIFETIME_S,
    MAX_CLOCK_SKEW_S,
    MAX_EVIDENCE_BYTES,
    MAX_MODELS,
    Advert,
    AdvertRejected,
    Capacity,
    Load,
    ModelOffer,
    RejectReason,
    TonPayee,
    decode_and_verify,
    encode_body,
    encode_signed,
    sign_body,
)
from meshnode.core.peerid import PeerIdError, ed25519_from_peer_id, peer_id_from_ed25519

NOW = 1_700_000_000.0
SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))
GGUF_ID = hashlib.sha256(b"a tiny gguf").hexdigest()


def make_advert(seed: bytes = SEED, **changes: object) -> Advert:
    pubkey = bytes(SigningKey(seed).verify_key)
    advert = Advert(
        peer_id=peer_id_from_ed25519(pubkey),
        peer_pubkey=pubkey,
        addrs=("/ip4/127.0.0.1/tcp/4001",),
        models=(
            ModelOffer(
                id=GGUF_ID,
                name="gemma-3-270m",
                quant="Q4_K_M",
                ctx=8192,
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
    return dataclasses.replace(advert, **changes)  # type: ignore[arg-type]


def rejection(data: bytes, now: float = NOW) -> RejectReason:
    with pytest.raises(AdvertRejected) as info:
        decode_and_verify(data, now)
    return info.value.reason


# ----------------------------------------------------------------------------- peer ids


def test_peer_id_matches_libp2p_for_the_same_key() -> None:
    key_pair = create_new_key_pair(b"\x05" * 32)
    raw_pubkey = key_pair.public_key.to_bytes()
    assert peer_id_from_ed25519(raw_pubkey) == ID.from_pubkey(key_pair.public_key).to_base58()


def test_peer_id_parses_back_to_the_public_key() -> None:
    raw_pubkey = create_new_key_pair(b"\x06" * 32).public_key.to_bytes()
    assert ed25519_from_peer_id(peer_id_from_ed25519(raw_pubkey)) == raw_pubkey


def test_peer_id_of_a_libp2p_generated_key_parses_to_that_key() -> None:
    key_pair = create_new_key_pair()
    text = ID.from_pubkey(key_pair.public_key).to_base58()
    assert ed25519_from_peer_id(text) == key_pair.public_key.to_bytes()


def test_peer_id_rejects_a_key_of_the_wrong_length() -> None:
    with pytest.raises(PeerIdError):
        peer_id_from_ed25519(b"\x00" * 31)


@pytest.mark.parametrize("text", ["", "0OIl", "Qm" + "1" * 44, "12D3KooW" + "z" * 80])
def test_peer_id_parse_rejects_non_ed25519_text(text: str) -> None:
    with pytest.raises(PeerIdError):
        ed25519_from_peer_id(text)


# ---------------------------------------------------------------------------- round trip


def test_signed_advert_round_trips() -> None:
    advert = make_advert()
    decoded = decode_and_verify(encode_signed(advert, SEED), NOW)
    assert decoded == advert


def test_advert_without_ton_or_evidence_round_trips() -> None:
    advert = make_advert(ton=None, attestation=b"")
    assert decode_and_verify(encode_signed(advert, SEED), NOW) == advert


def test_encoding_is_canonical_whatever_the_evidence_key_order() -> None:
    a = make_advert(attestation={"b": 1, "a": {"y": 2, "x": 3}})
    b = make_advert(attestation={"a": {"x": 3, "y": 2}, "b": 1})
    assert encode_signed(a, SEED) == encode_signed(b, SEED)


def test_offer_lookup_by_id_or_name() -> None:
    advert = make_advert()
    assert advert.offer_for(GGUF_ID) is advert.models[0]
    assert advert.offer_for("gemma-3-270m") is advert.models[0]
    assert advert.offer_for("other") is None


def test_encode_refuses_a_seed_that_is_not_the_advert_key() -> None:
    with pytest.raises(ValueError, match="does not belong"):
        encode_signed(make_advert(), OTHER_SEED)


def test_encode_refuses_what_receivers_would_reject() -> None:
    bad = make_advert(models=(dataclasses.replace(make_advert().models[0], id="XYZ"),))
    with pytest.raises(AdvertRejected) as info:
        encode_signed(bad, SEED)
    assert info.value.reason is RejectReason.BAD_MODEL_ID


# ---------------------------------------------------------------------------- rejections


def test_forged_signature_is_rejected() -> None:
    body = encode_body(make_advert())
    forged = SigningKey(OTHER_SEED).sign(ADVERT_DOMAIN_TAG + body).signature
    data = msgpack.packb([ADVERT_VERSION, body, forged], use_bin_type=True)
    assert rejection(data) is RejectReason.BAD_SIGNATURE


def test_tampered_body_is_rejected() -> None:
    data = encode_signed(make_advert(), SEED)
    version, body, signature = msgpack.unpackb(data)
    tampered = encode_body(make_advert(seq=99))
    assert len(tampered) == len(body)
    data = msgpack.packb([version, tampered, signature], use_bin_type=True)
    assert rejection(data) is RejectReason.BAD_SIGNATURE


def test_signature_without_domain_tag_is_rejected() -> None:
    body = encode_body(make_advert())
    untagged = SigningKey(SEED).sign(body).signature
    data = msgpack.packb([ADVERT_VERSION, body, untagged], use_bin_type=True)
    assert rejection(data) is RejectReason.BAD_SIGNATURE


def test_peer_id_not_derived_from_the_key_is_rejected() -> None:
    other_id = peer_id_from_ed25519(bytes(SigningKey(OTHER_SEED).verify_key))
    data = sign_body(encode_body(make_advert(peer_id=other_id)), SEED)
    assert rejection(data) is RejectReason.PEER_ID_MISMATCH


def test_expired_advert_is_rejected() -> None:
    data = encode_signed(make_advert(), SEED)
    assert rejection(data, now=NOW + 301) is RejectReason.EXPIRED


def test_advert_from_beyond_the_clock_skew_window_is_rejected() -> None:
    issued = NOW + MAX_CLOCK_SKEW_S + 1
    data = encode_signed(make_advert(issued_at=issued, expires_at=issued + 60), SEED)
    assert rejection(data) is RejectReason.FROM_FUTURE


def test_advert_slightly_ahead_within_the_skew_window_is_accepted() -> None:
    issued = NOW + MAX_CLOCK_SKEW_S - 1
    advert = make_advert(issued_at=issued, expires_at=issued + 60)
    assert decode_and_verify(encode_signed(advert, SEED), NOW) == advert


def test_lifetime_above_the_limit_is_rejected() -> None:
    data = encode_signed(make_advert(expires_at=NOW + MAX_ADVERT_LIFETIME_S + 1), SEED)
    assert rejection(data) is RejectReason.LIFETIME_TOO_LONG


def test_oversized_advert_is_rejected_before_decoding() -> None:
    # Not even msgpack: only a check made before parsing can name the size.
    assert rejection(b"\xc1" * (MAX_ADVERT_BYTES + 1)) is RejectReason.TOO_LARGE


def test_evidence_above_its_limit_is_rejected() -> None:
    advert = make_advert(attestation=b"\x00" * (MAX_EVIDENCE_BYTES + 1))
    assert rejection(sign_body(encode_body(advert), SEED)) is RejectReason.EVIDENCE_TOO_LARGE


@pytest.mark.parametrize(
    "model_id", ["", GGUF_ID.upper(), GGUF_ID[:-1], GGUF_ID + "0", "g" * 64, "../../etc"]
)
def test_malformed_model_id_is_rejected(model_id: str) -> None:
    offer = dataclasses.replace(make_advert().models[0], id=model_id)
    data = sign_body(encode_body(make_advert(models=(offer,))), SEED)
    assert rejection(data) is RejectReason.BAD_MODEL_ID


def test_too_many_models_is_rejected() -> None:
    base = make_advert().models[0]
    offers = tuple(
        dataclasses.replace(base, id=hashlib.sha256(bytes([i])).hexdigest())
        for i in range(MAX_MODELS + 1)
    )
    data = sign_body(encode_body(make_advert(models=offers)), SEED)
    assert rejection(data) is RejectReason.TOO_MANY_MODELS


def test_too_many_addrs_is_rejected() -> None:
    addrs = tuple(f"/ip4/127.0.0.1/tcp/{4000 + i}" for i in range(MAX_ADDRS + 1))
    data = sign_body(encode_body(make_advert(addrs=addrs)), SEED)
    assert rejection(data) is RejectReason.TOO_MANY_ADDRS


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        msgpack.packb({"not": "an envelope"}),
        msgpack.packb([ADVERT_VERSION, b"\x93\x01\x02\x03", b"\x00" * 64]),
        msgpack.packb([ADVERT_VERSION, "body-as-text", b"\x00" * 64]),
    ],
)
def test_bytes_that_are_not_an_advert_are_malformed(data: bytes) -> None:
    assert rejection(data) is RejectReason.MALFORMED


def test_wrong_field_type_is_malformed() -> None:
    wire = msgpack.unpackb(encode_body(make_advert()))
    wire["seq"] = "1"
    data = sign_body(msgpack.packb(wire, use_bin_type=True), SEED)
    assert rejection(data) is RejectReason.MALFORMED


def test_non_canonical_body_is_malformed() -> None:
    wire = msgpack.unpackb(encode_body(make_advert()))
    reordered = dict(reversed(list(wire.items())))
    data = sign_body(msgpack.packb(reordered, use_bin_type=True), SEED)
    assert rejection(data) is RejectReason.MALFORMED


def test_unknown_version_is_rejected() -> None:
    body = encode_body(make_advert())
    signature = SigningKey(SEED).sign(ADVERT_DOMAIN_TAG + body).signature
    data = msgpack.packb([ADVERT_VERSION + 1, body, signature], use_bin_type=True)
    assert rejection(data) is RejectReason.UNSUPPORTED_VERSION


def test_malformed_wallet_address_is_rejected() -> None:
    ton = TonPayee(channel_pubkey=b"\x09" * 32, wallet_address="not a wallet")
    data = sign_body(encode_body(make_advert(ton=ton)), SEED)
    assert rejection(data) is RejectReason.MALFORMED


def test_chat_format_round_trips_and_is_optional_on_the_wire() -> None:
    with_chat = make_advert()
    offer = dataclasses.replace(with_chat.models[0], chat_format="qa")
    signed = encode_signed(dataclasses.replace(with_chat, models=(offer,)), SEED)
    assert decode_and_verify(signed, NOW).models[0].chat_format == "qa"
    plain = decode_and_verify(encode_signed(make_advert(), SEED), NOW)
    assert plain.models[0].chat_format == ""
    assert b"chat" not in encode_body(make_advert())


def test_malformed_chat_format_is_rejected() -> None:
    offer = dataclasses.replace(make_advert().models[0], chat_format="Not A Name!")
    body = encode_body(dataclasses.replace(make_advert(), models=(offer,)))
    assert rejection(sign_body(body, SEED)) is RejectReason.MALFORMED
