"""Directory of live adverts: admission, rejection counters, TTL, caps, verification."""

from __future__ import annotations

import dataclasses
import hashlib

import msgpack
import pytest
from nacl.signing import SigningKey

from meshnode.core.advert import (
    ADVERT_DOMAIN_TAG,
    ADVERT_VERSION,
    MAX_ADVERT_BYTES,
    MAX_CLOCK_SKEW_S,
    Advert,
    Capacity,
    Load,
    ModelOffer,
    RejectReason,
    encode_body,
    encode_signed,
    sign_body,
)
from meshnode.core.directory import (
    RATE_BURST,
    RATE_PER_S,
    AttestCheck,
    AttestVerdict,
    Directory,
    Verification,
)
from meshnode.core.peerid import peer_id_from_ed25519

NOW = 1_700_000_000.0
GEMMA = hashlib.sha256(b"gemma").hexdigest()
LLAMA = hashlib.sha256(b"llama").hexdigest()


def seed(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(4, "big")).digest()


def offer(model_id: str = GEMMA, name: str = "gemma", price: int = 1000) -> ModelOffer:
    return ModelOffer(
        id=model_id,
        name=name,
        quant="Q4_K_M",
        ctx=4096,
        price_prompt_per_1k=price,
        price_completion_per_1k=price,
    )


def advert(n: int, seq: int = 1, ttl: float = 300, issued: float = NOW, **kw: object) -> Advert:
    pubkey = bytes(SigningKey(seed(n)).verify_key)
    base = Advert(
        peer_id=peer_id_from_ed25519(pubkey),
        peer_pubkey=pubkey,
        addrs=(f"/ip4/127.0.0.1/tcp/{5000 + n}",),
        models=(offer(),),
        capacity=Capacity(slots=1, tokens_per_s=20.0),
        load=Load(busy_slots=0, queue_len=0),
        job_pubkey=b"\x01" * 32,
        attestation={"kind": "dev", "n": n},
        seq=seq,
        issued_at=issued,
        expires_at=issued + ttl,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def signed(n: int, **kw: object) -> bytes:
    return encode_signed(advert(n, **kw), seed(n))


def peer(n: int) -> str:
    return advert(n).peer_id


def forged(n: int) -> bytes:
    body = encode_body(advert(n, seq=2))
    signature = SigningKey(seed(999)).sign(ADVERT_DOMAIN_TAG + body).signature
    return msgpack.packb([ADVERT_VERSION, body, signature], use_bin_type=True)


def bad_model_id(n: int) -> bytes:
    return sign_body(encode_body(advert(n, seq=2, models=(offer(model_id="nothex"),))), seed(n))


def directory_with_good_peer() -> Directory:
    d = Directory()
    assert d.insert(signed(1), NOW).accepted
    return d


# ------------------------------------------------------------------------------- basics


def test_valid_advert_is_listed_for_its_model_by_id_and_by_name() -> None:
    d = directory_with_good_peer()
    assert [p.peer_id for p in d.providers_for(GEMMA, NOW)] == [peer(1)]
    assert [p.peer_id for p in d.providers_for("gemma", NOW)] == [peer(1)]
    assert d.providers_for(LLAMA, NOW) == []
    assert d.counters()["accepted"] == 1


def test_newer_seq_replaces_the_entry() -> None:
    d = directory_with_good_peer()
    result = d.insert(signed(1, seq=2, load=Load(busy_slots=1, queue_len=3)), NOW + 1)
    assert result.accepted
    listing = d.get(peer(1), NOW + 1)
    assert listing is not None and listing.advert.load.queue_len == 3
    assert len(d) == 1


def test_models_summarises_providers_and_cheapest_price() -> None:
    d = Directory()
    d.insert(signed(1, models=(offer(price=500), offer(LLAMA, "llama"))), NOW)
    d.insert(signed(2, models=(offer(price=300),)), NOW)
    d.set_verification(peer(2), True, "ok")
    summaries = {s.id: s for s in d.models(NOW)}
    assert summaries[GEMMA].providers == 2
    assert summaries[GEMMA].verified_providers == 1
    assert summaries[GEMMA].min_price_prompt_per_1k == 300
    assert summaries[LLAMA].providers == 1


# ---------------------------------------------------------------------------------- TTL


def test_entry_disappears_from_queries_once_expired() -> None:
    d = directory_with_good_peer()
    assert d.peers(NOW + 299)
    assert d.peers(NOW + 300) == []
    assert d.providers_for(GEMMA, NOW + 300) == []


def test_expire_drops_only_expired_entries() -> None:
    d = Directory()
    d.insert(signed(1, ttl=60), NOW)
    d.insert(signed(2, ttl=600), NOW)
    assert d.expire(NOW + 61) == [peer(1)]
    assert [e.peer_id for e in d.peers(NOW + 61)] == [peer(2)]
    assert len(d) == 1


# ------------------------------------------------------------------- counted rejections


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (forged(1), RejectReason.BAD_SIGNATURE),
        (signed(1, seq=2, issued=NOW - 400), RejectReason.EXPIRED),
        (
            signed(1, seq=2, issued=NOW + MAX_CLOCK_SKEW_S + 60, ttl=60),
            RejectReason.FROM_FUTURE,
        ),
        (signed(1, seq=1), RejectReason.STALE_SEQ),
        (b"\x00" * (MAX_ADVERT_BYTES + 1), RejectReason.TOO_LARGE),
        (bad_model_id(1), RejectReason.BAD_MODEL_ID),
        (b"not msgpack \xc1", RejectReason.MALFORMED),
    ],
    ids=["forged", "expired", "far-future", "replay", "oversized", "bad-model-id", "junk"],
)
def test_rejection_is_counted_and_keeps_the_good_entry(data: bytes, reason: RejectReason) -> None:
    d = directory_with_good_peer()
    good = d.get(peer(1), NOW)
    result = d.insert(data, NOW)
    assert (result.accepted, result.reason) == (False, reason)
    assert d.counters()[reason.value] == 1
    assert d.get(peer(1), NOW) == good


def test_replayed_older_seq_is_stale() -> None:
    d = Directory()
    d.insert(signed(1, seq=5), NOW)
    result = d.insert(signed(1, seq=4), NOW)
    assert result.reason is RejectReason.STALE_SEQ
    listing = d.get(peer(1), NOW)
    assert listing is not None and listing.advert.seq == 5


def test_flood_from_one_peer_is_rate_limited_without_touching_others() -> None:
    d = Directory()
    d.insert(signed(2), NOW)
    results = [d.insert(signed(1, seq=s), NOW) for s in range(1, 21)]
    accepted = sum(r.accepted for r in results)
    assert accepted == int(RATE_BURST)
    assert d.counters()[RejectReason.RATE_LIMITED.value] == 20 - accepted
    assert [e.peer_id for e in d.peers(NOW)] == sorted([peer(1), peer(2)])


def test_rate_limited_peer_is_accepted_again_after_refill() -> None:
    d = Directory()
    for s in range(1, int(RATE_BURST) + 2):
        d.insert(signed(1, seq=s), NOW)
    assert d.insert(signed(1, seq=50), NOW).reason is RejectReason.RATE_LIMITED
    assert d.insert(signed(1, seq=51), NOW + 1 / RATE_PER_S).accepted


def test_a_directory_built_with_a_faster_rate_refills_faster() -> None:
    d = Directory(rate_per_s=1.0)  # a what-if of the routing lab; nodes keep RATE_PER_S
    for s in range(1, int(RATE_BURST) + 1):
        assert d.insert(signed(1, seq=s), NOW).accepted
    assert d.insert(signed(1, seq=20), NOW).reason is RejectReason.RATE_LIMITED
    assert d.insert(signed(1, seq=21), NOW + 1.0).accepted  # the default needs 1/RATE_PER_S
    assert Directory().insert(signed(1, seq=1), NOW).accepted
    with pytest.raises(ValueError):
        Directory(rate_per_s=0.0)


def test_replays_do_not_spend_the_peers_rate_budget() -> None:
    d = directory_with_good_peer()
    replay = signed(1)
    for _ in range(50):
        d.insert(replay, NOW)
    assert d.insert(signed(1, seq=2), NOW).accepted


# -------------------------------------------------------------------------------- caps


def test_full_directory_of_verified_entries_rejects_newcomers() -> None:
    d = Directory(max_entries=3)
    for n in range(3):
        d.insert(signed(n), NOW)
        d.set_verification(peer(n), True, "tdx ok")
    result = d.insert(signed(7, ttl=900), NOW)
    assert result.reason is RejectReason.DIRECTORY_FULL
    assert {e.peer_id for e in d.peers(NOW)} == {peer(0), peer(1), peer(2)}
    assert d.counters()["directory_full"] == 1


def test_a_pending_newcomer_never_evicts_a_pending_entry_however_long_it_lives() -> None:
    d = Directory(max_entries=3)
    d.insert(signed(0, ttl=100), NOW)
    d.insert(signed(1, ttl=50), NOW)
    d.insert(signed(2, ttl=200), NOW)
    result = d.insert(signed(3, ttl=900), NOW)
    assert result.reason is RejectReason.DIRECTORY_FULL
    assert {e.peer_id for e in d.peers(NOW)} == {peer(0), peer(1), peer(2)}


def _attest_good(*good: int) -> AttestCheck:
    """An attestation check that passes the evidence of peers ``good`` only."""

    def check(adv: Advert, now: float) -> AttestVerdict:
        ok = adv.attestation.get("n") in good
        return AttestVerdict(
            Verification.VERIFIED if ok else Verification.FAILED,
            "test: allowlisted" if ok else "test: not allowlisted",
        )

    return check


def test_with_an_attest_check_adverts_are_stored_already_verified_or_failed() -> None:
    d = Directory(attest=_attest_good(1))
    good = d.insert(signed(1), NOW)
    bad = d.insert(signed(2), NOW)
    assert good.listing is not None and good.listing.verified and not good.needs_verification
    assert bad.listing is not None and bad.listing.verification is Verification.FAILED
    assert d.pending_verification(NOW) == [] and d.attest_checks == 2
    d.insert(signed(1, seq=2, load=Load(busy_slots=1, queue_len=0)), NOW)
    assert d.attest_checks == 2  # same evidence: not checked again


def test_a_verified_newcomer_replaces_the_soonest_expiring_pending_entry() -> None:
    d = Directory(max_entries=3)
    d.insert(signed(0, ttl=100), NOW)
    d.insert(signed(1, ttl=50), NOW)
    d.insert(signed(2, ttl=200), NOW)
    d.attest = _attest_good(3)
    result = d.insert(signed(3, ttl=60), NOW)
    assert result.accepted and result.evicted == peer(1)
    assert {e.peer_id for e in d.peers(NOW)} == {peer(0), peer(2), peer(3)}


def test_a_flood_of_long_lived_fresh_ids_cannot_evict_a_checked_provider() -> None:
    """The bootstrap-node case: a real provider with a short-lived advert, then hundreds
    of validly signed adverts of fresh keys that live longer. The provider stays."""
    flood = 500
    d = Directory(max_entries=64, attest=_attest_good(0))
    d.insert(signed(0, ttl=60), NOW)
    results = [d.insert(signed(n, ttl=900), NOW) for n in range(1000, 1000 + flood)]
    assert peer(0) in {e.peer_id for e in d.peers(NOW)}
    assert [p.peer_id for p in d.providers_for(GEMMA, NOW) if p.listing.verified] == [peer(0)]
    assert len(d) == 64 and sum(r.accepted for r in results) == 63  # the free slots only
    assert d.counters()["directory_full"] == flood - 63


def test_at_equal_trust_the_incumbent_stays() -> None:
    d = Directory(max_entries=2)
    d.insert(signed(0, ttl=50), NOW)
    d.insert(signed(1, ttl=60), NOW)
    d.set_verification(peer(0), False, "dev refused")
    d.set_verification(peer(1), False, "dev refused")
    d.attest = _attest_good()  # everything fails
    assert d.insert(signed(2, ttl=900), NOW).reason is RejectReason.DIRECTORY_FULL
    assert {e.peer_id for e in d.peers(NOW)} == {peer(0), peer(1)}


def test_newcomer_expiring_before_every_entry_is_rejected() -> None:
    d = Directory(max_entries=2)
    d.insert(signed(0, ttl=100), NOW)
    d.insert(signed(1, ttl=100), NOW)
    assert d.insert(signed(2, ttl=50), NOW).reason is RejectReason.DIRECTORY_FULL
    assert {e.peer_id for e in d.peers(NOW)} == {peer(0), peer(1)}


def test_failed_attestation_entries_go_first() -> None:
    d = Directory(max_entries=2)
    d.insert(signed(0, ttl=50), NOW)
    d.insert(signed(1, ttl=900), NOW)
    d.set_verification(peer(1), False, "debug bit set")
    result = d.insert(signed(2, ttl=100), NOW)
    assert result.evicted == peer(1)


def test_expired_entries_make_room_before_anything_else() -> None:
    d = Directory(max_entries=2)
    d.insert(signed(0, ttl=10), NOW)
    d.insert(signed(1, ttl=900), NOW)
    d.set_verification(peer(1), True, "ok")
    assert d.insert(signed(2, ttl=100, issued=NOW + 20), NOW + 20).evicted == peer(0)


def test_sybil_flood_never_evicts_verified_entries() -> None:
    d = Directory(max_entries=4)
    for n in range(2):
        d.insert(signed(n, ttl=60), NOW)
        d.set_verification(peer(n), True, "tdx ok")
    for n in range(100, 130):
        d.insert(signed(n, ttl=900), NOW)
    live = {e.peer_id for e in d.peers(NOW)}
    assert {peer(0), peer(1)} <= live
    assert len(live) == 4


# ------------------------------------------------------------------------- verification


def test_new_adverts_start_pending_and_ask_for_verification() -> None:
    d = Directory()
    result = d.insert(signed(1), NOW)
    assert result.needs_verification
    assert result.listing is not None and result.listing.verification is Verification.PENDING
    assert [e.peer_id for e in d.pending_verification(NOW)] == [peer(1)]


def test_verdict_is_recorded_with_its_reason() -> None:
    d = directory_with_good_peer()
    assert d.set_verification(peer(1), False, "MRTD not in allowlist")
    listing = d.get(peer(1), NOW)
    assert listing is not None
    assert (listing.verification, listing.verification_reason) == (
        Verification.FAILED,
        "MRTD not in allowlist",
    )


def test_verification_survives_an_update_with_the_same_evidence() -> None:
    d = directory_with_good_peer()
    d.set_verification(peer(1), True, "ok")
    result = d.insert(signed(1, seq=2, load=Load(busy_slots=1, queue_len=0)), NOW)
    assert not result.needs_verification
    assert result.listing is not None and result.listing.verified


def test_new_evidence_resets_verification() -> None:
    d = directory_with_good_peer()
    d.set_verification(peer(1), True, "ok")
    result = d.insert(signed(1, seq=2, attestation={"kind": "dev", "n": 42}), NOW)
    assert result.needs_verification
    assert result.listing is not None and result.listing.verification is Verification.PENDING


def test_verdict_about_older_evidence_is_ignored() -> None:
    d = directory_with_good_peer()
    d.insert(signed(1, seq=2, job_pubkey=b"\x02" * 32), NOW)
    assert not d.set_verification(peer(1), True, "checked seq 1", seq=1)
    listing = d.get(peer(1), NOW)
    assert listing is not None and listing.verification is Verification.PENDING


def test_verdict_for_an_unknown_peer_is_not_applied() -> None:
    assert not Directory().set_verification(peer(1), True, "ok")
