"""EvidenceVerifier end to end on synthetic TDX quotes signed under a test root CA,
so the binding, debug, measurement and TCB checks run on any machine."""

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from attest_synth import (
    DEBUG_TD_ATTRIBUTES,
    SYNTH_MRTD,
    SYNTH_RTMRS,
    SynthPlatform,
    synth_platform,
)
from nacl.signing import SigningKey

from meshnode.attest.collateral import CollateralCache, load_collateral_json
from meshnode.attest.dev import DevEvidenceProducer
from meshnode.attest.evidence import Evidence
from meshnode.attest.verifier import EvidenceVerifier
from meshnode.core.attest_binding import (
    EPOCH_SECONDS,
    BindingInputs,
    epoch_at,
    gpu_evidence_hash,
    report_data_for,
)
from meshnode.core.attest_policy import AttestationPolicy, MeasurementRule, Reason, Verdict

PEER_ID = "12D3KooWsynthetic"
JOB = bytes([0xA1]) * 32
PEER = bytes([0xB2]) * 32
# Nothing listens on the discard port of loopback: a test that dialed it would fail fast.
UNREACHABLE_PCCS = "http://127.0.0.1:9"

POLICY = AttestationPolicy(
    allowed_tcb_statuses=frozenset({"UpToDate"}),
    measurements=(MeasurementRule("synth", SYNTH_MRTD, (*SYNTH_RTMRS[:3], None)),),
    allow_dynamic_platform=True,
    allow_cached_keys=True,
    allow_smt=True,
    pccs_url=UNREACHABLE_PCCS,
)


@pytest.fixture(scope="module")
def plat() -> SynthPlatform:
    return synth_platform()


def _verifier(plat: SynthPlatform, policy: AttestationPolicy = POLICY) -> EvidenceVerifier:
    return EvidenceVerifier(policy, root_ca_der=plat.root_ca_der)


def _bound_quote(plat: SynthPlatform, job: bytes = JOB, **kw: Any) -> Evidence:
    rd = report_data_for(BindingInputs(job, PEER), epoch_at(plat.verify_time))
    return Evidence(kind="tdx", blob=plat.quote(rd, **kw))


def _check(v: EvidenceVerifier, plat: SynthPlatform, ev: Evidence, collateral: Any) -> Verdict:
    return v.verify(
        ev,
        peer_id=PEER_ID,
        job_pub=JOB,
        peer_pub=PEER,
        now=plat.verify_time,
        collateral=collateral,
    )


@pytest.fixture(scope="module")
def collateral(plat: SynthPlatform) -> Any:
    return load_collateral_json(plat.collateral_json())


def test_quote_binding_these_keys_is_accepted_with_its_claims(
    plat: SynthPlatform, collateral: Any
) -> None:
    verdict = _check(_verifier(plat), plat, _bound_quote(plat), collateral)
    assert verdict.ok and verdict.reason == Reason.OK and not verdict.insecure
    assert verdict.claims is not None
    assert verdict.claims.mrtd == SYNTH_MRTD and verdict.claims.tcb_status == "UpToDate"
    assert verdict.claims.rtmrs == SYNTH_RTMRS
    assert verdict.epoch == epoch_at(plat.verify_time)


def test_quote_binding_another_job_key_is_rejected_as_binding(
    plat: SynthPlatform, collateral: Any
) -> None:
    verdict = _check(_verifier(plat), plat, _bound_quote(plat, job=bytes(32)), collateral)
    assert not verdict.ok and verdict.reason == Reason.BINDING


def test_debug_td_is_rejected_as_debug(plat: SynthPlatform, collateral: Any) -> None:
    ev = _bound_quote(plat, td_attributes=DEBUG_TD_ATTRIBUTES)
    verdict = _check(_verifier(plat), plat, ev, collateral)
    assert not verdict.ok and verdict.reason == Reason.DEBUG


def test_measurement_outside_the_allowlist_is_rejected_as_measurement(
    plat: SynthPlatform, collateral: Any
) -> None:
    ev = _bound_quote(plat, mrtd=bytes([0x99]) * 48)
    verdict = _check(_verifier(plat), plat, ev, collateral)
    assert not verdict.ok and verdict.reason == Reason.MEASUREMENT


def test_out_of_date_tcb_is_rejected_by_a_strict_policy(plat: SynthPlatform) -> None:
    outdated = load_collateral_json(plat.collateral_json("OutOfDate"))
    verdict = _check(_verifier(plat), plat, _bound_quote(plat), outdated)
    assert not verdict.ok and verdict.reason == Reason.TCB_STATUS


def test_out_of_date_tcb_passes_a_policy_that_allows_it_with_grace(plat: SynthPlatform) -> None:
    lenient = replace(
        POLICY, allowed_tcb_statuses=frozenset({"UpToDate", "OutOfDate"}), tcb_grace_days=365
    )
    outdated = load_collateral_json(plat.collateral_json("OutOfDate"))
    verdict = _check(_verifier(plat, lenient), plat, _bound_quote(plat), outdated)
    assert verdict.ok and verdict.claims is not None
    assert verdict.claims.tcb_status == "OutOfDate"


def test_rejected_advisory_is_rejected_as_advisory(plat: SynthPlatform) -> None:
    policy = replace(
        POLICY,
        allowed_tcb_statuses=frozenset({"UpToDate", "SWHardeningNeeded"}),
        rejected_advisories=frozenset({"INTEL-SA-00615"}),
    )
    col = load_collateral_json(plat.collateral_json("SWHardeningNeeded", ("INTEL-SA-00615",)))
    verdict = _check(_verifier(plat, policy), plat, _bound_quote(plat), col)
    assert not verdict.ok and verdict.reason == Reason.ADVISORY


def test_dynamic_platform_is_rejected_unless_allowed(plat: SynthPlatform, collateral: Any) -> None:
    strict = replace(POLICY, allow_dynamic_platform=False)
    verdict = _check(_verifier(plat, strict), plat, _bound_quote(plat), collateral)
    assert not verdict.ok and verdict.reason == Reason.PLATFORM


def test_quote_from_another_root_ca_is_invalid(plat: SynthPlatform, collateral: Any) -> None:
    stranger = synth_platform()
    rd = report_data_for(BindingInputs(JOB, PEER), epoch_at(plat.verify_time))
    ev = Evidence(kind="tdx", blob=stranger.quote(rd))
    strangers_col = load_collateral_json(stranger.collateral_json())
    verdict = _check(_verifier(plat), plat, ev, strangers_col)
    assert not verdict.ok and verdict.reason == Reason.QUOTE_INVALID


def test_tampered_report_data_breaks_the_quote_signature(
    plat: SynthPlatform, collateral: Any
) -> None:
    blob = bytearray(_bound_quote(plat).blob)
    blob[600] ^= 0x01
    verdict = _check(_verifier(plat), plat, Evidence(kind="tdx", blob=bytes(blob)), collateral)
    assert not verdict.ok and verdict.reason == Reason.QUOTE_INVALID


def test_collateral_past_next_update_is_expired(plat: SynthPlatform, collateral: Any) -> None:
    v = _verifier(plat)
    verdict = v.verify(
        _bound_quote(plat),
        peer_id=PEER_ID,
        job_pub=JOB,
        peer_pub=PEER,
        now=plat.verify_time + 60 * 86400,
        collateral=collateral,
    )
    assert not verdict.ok and verdict.reason == Reason.COLLATERAL_EXPIRED


def test_gpu_evidence_hash_is_part_of_the_binding(plat: SynthPlatform, collateral: Any) -> None:
    rd = report_data_for(
        BindingInputs(JOB, PEER, gpu_evidence_hash(b"gpu A")), epoch_at(plat.verify_time)
    )
    quote = plat.quote(rd)
    v = _verifier(plat)
    good = _check(v, plat, Evidence("tdx", quote, gpu_evidence=b"gpu A"), collateral)
    swapped = _check(v, plat, Evidence("tdx", quote, gpu_evidence=b"gpu B"), collateral)
    assert good.ok and swapped.reason == Reason.BINDING


# ------------------------------------------------------------- caches, offline use


def test_without_cached_collateral_the_verdict_is_collateral_missing(
    plat: SynthPlatform, tmp_path: Path
) -> None:
    v = EvidenceVerifier(
        POLICY, CollateralCache(tmp_path, UNREACHABLE_PCCS), root_ca_der=plat.root_ca_der
    )
    verdict = v.verify(
        _bound_quote(plat), peer_id=PEER_ID, job_pub=JOB, peer_pub=PEER, now=plat.verify_time
    )
    assert verdict.reason == Reason.COLLATERAL_MISSING


def test_collateral_cached_on_disk_verifies_offline(
    plat: SynthPlatform, collateral: Any, tmp_path: Path
) -> None:
    ev = _bound_quote(plat)
    CollateralCache(tmp_path, UNREACHABLE_PCCS).store(ev.blob, collateral)
    # A new verifier (a restarted client) finds it on disk; the PCCS is never needed.
    v = EvidenceVerifier(
        POLICY, CollateralCache(tmp_path, UNREACHABLE_PCCS), root_ca_der=plat.root_ca_der
    )
    verdict = v.verify(ev, peer_id=PEER_ID, job_pub=JOB, peer_pub=PEER, now=plat.verify_time)
    assert verdict.ok


def test_verdict_is_cached_per_peer_and_evidence(
    plat: SynthPlatform, collateral: Any, tmp_path: Path
) -> None:
    ev = _bound_quote(plat)
    cache = CollateralCache(tmp_path, UNREACHABLE_PCCS)
    path = cache.store(ev.blob, collateral)
    v = EvidenceVerifier(POLICY, cache, root_ca_der=plat.root_ca_der)
    first = v.verify(ev, peer_id=PEER_ID, job_pub=JOB, peer_pub=PEER, now=plat.verify_time)
    path.unlink()
    again = v.verify(ev, peer_id=PEER_ID, job_pub=JOB, peer_pub=PEER, now=plat.verify_time)
    other_peer = v.verify(ev, peer_id="other", job_pub=JOB, peer_pub=PEER, now=plat.verify_time)
    assert first.ok and again is first
    assert other_peer.reason == Reason.COLLATERAL_MISSING


def test_cached_ok_verdict_expires_with_its_epoch_window(
    plat: SynthPlatform, collateral: Any
) -> None:
    v = _verifier(plat)
    ev = _bound_quote(plat)
    assert _check(v, plat, ev, collateral).ok
    later = (epoch_at(plat.verify_time) + 2) * EPOCH_SECONDS
    verdict = v.verify(
        ev, peer_id=PEER_ID, job_pub=JOB, peer_pub=PEER, now=later, collateral=collateral
    )
    assert verdict.reason == Reason.BINDING


async def test_async_verify_uses_fresh_disk_cache_without_network(
    plat: SynthPlatform, collateral: Any, tmp_path: Path
) -> None:
    ev = _bound_quote(plat)
    cache = CollateralCache(tmp_path, UNREACHABLE_PCCS)
    cache.store(ev.blob, collateral)
    v = EvidenceVerifier(POLICY, cache, root_ca_der=plat.root_ca_der)
    verdict = await v.verify_async(
        ev, peer_id=PEER_ID, job_pub=JOB, peer_pub=PEER, now=plat.verify_time
    )
    assert verdict.ok


async def test_async_verify_with_unreachable_pccs_reports_expired(
    plat: SynthPlatform, collateral: Any, tmp_path: Path
) -> None:
    ev = _bound_quote(plat)
    cache = CollateralCache(tmp_path, UNREACHABLE_PCCS)
    cache.store(ev.blob, collateral)
    v = EvidenceVerifier(POLICY, cache, root_ca_der=plat.root_ca_der)
    verdict = await v.verify_async(
        ev, peer_id=PEER_ID, job_pub=JOB, peer_pub=PEER, now=plat.verify_time + 60 * 86400
    )
    assert verdict.reason == Reason.COLLATERAL_EXPIRED


# ---------------------------------------------------------------------------- dev


def _dev(now: float, key: SigningKey) -> Evidence:
    rd = report_data_for(BindingInputs(JOB, bytes(key.verify_key)), epoch_at(now))
    return DevEvidenceProducer(key).produce(rd)


def test_dev_evidence_is_refused_by_default() -> None:
    key, now = SigningKey.generate(), 1_750_000_000.0
    v = EvidenceVerifier(POLICY)
    verdict = v.verify(
        _dev(now, key), peer_id=PEER_ID, job_pub=JOB, peer_pub=bytes(key.verify_key), now=now
    )
    assert not verdict.ok and verdict.reason == Reason.DEV


def test_dev_evidence_is_accepted_as_insecure_when_allowed() -> None:
    key, now = SigningKey.generate(), 1_750_000_000.0
    v = EvidenceVerifier(POLICY, allow_insecure=True)
    verdict = v.verify(
        _dev(now, key), peer_id=PEER_ID, job_pub=JOB, peer_pub=bytes(key.verify_key), now=now
    )
    assert verdict.ok and verdict.insecure and verdict.reason == Reason.DEV
    assert "INSECURE" in verdict.message


def test_dev_evidence_signed_by_another_peer_key_is_refused() -> None:
    key, now = SigningKey.generate(), 1_750_000_000.0
    v = EvidenceVerifier(POLICY, allow_insecure=True)
    verdict = v.verify(_dev(now, key), peer_id=PEER_ID, job_pub=JOB, peer_pub=PEER, now=now)
    assert not verdict.ok and verdict.reason == Reason.MALFORMED
