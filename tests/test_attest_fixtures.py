"""Real Intel TDX quotes and collateral (dcap-qvl's published samples) verified against
Intel's root CA. Skipped where ../shared/fixtures/tdx is absent; the synthetic tests in
test_attest_verifier.py cover the same checks everywhere."""

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from meshnode.attest.collateral import load_collateral_json
from meshnode.attest.evidence import Evidence
from meshnode.attest.local import verify_quote_file
from meshnode.attest.verifier import AttestationError, EvidenceVerifier
from meshnode.core.attest_policy import AttestationPolicy, MeasurementRule, Reason

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "tdx"
pytestmark = pytest.mark.skipif(
    not (FIXTURES / "tdx_quote").is_file(),
    reason=f"real TDX quote fixtures not found at {FIXTURES}",
)
# Byte ranges of the TD report body inside a v4 quote (48-byte header first).
REPORT_DATA = slice(568, 632)
MRTD = slice(48 + 136, 48 + 184)

STRICT = AttestationPolicy(allowed_tcb_statuses=frozenset({"UpToDate"}), measurements=())
CLOUD = AttestationPolicy(
    allowed_tcb_statuses=frozenset({"UpToDate"}),
    measurements=(),
    allow_dynamic_platform=True,
    allow_cached_keys=True,
    allow_smt=True,
)


def _inside_window(name: str) -> datetime:
    tcb_info = json.loads(
        json.loads((FIXTURES / f"{name}_collateral.json").read_text())["tcb_info"]
    )
    issued = datetime.fromisoformat(tcb_info["issueDate"].replace("Z", "+00:00"))
    return issued + timedelta(hours=1)


def _files(name: str) -> tuple[Path, Path]:
    return FIXTURES / name, FIXTURES / f"{name}_collateral.json"


def test_good_quote_verifies_inside_its_collateral_window() -> None:
    quote = (FIXTURES / "tdx_quote").read_bytes()
    claims = verify_quote_file(*_files("tdx_quote"), at=_inside_window("tdx_quote"), policy=CLOUD)
    assert claims.tcb_status == "UpToDate" and not claims.debug
    assert claims.report_data == quote[REPORT_DATA]
    assert claims.mrtd == quote[MRTD]


def test_one_flipped_bit_in_report_data_fails(tmp_path: Path) -> None:
    quote = bytearray((FIXTURES / "tdx_quote").read_bytes())
    quote[REPORT_DATA.start + 17] ^= 0x04
    bad = tmp_path / "flipped"
    bad.write_bytes(bytes(quote))
    with pytest.raises(AttestationError) as err:
        verify_quote_file(bad, _files("tdx_quote")[1], at=_inside_window("tdx_quote"))
    assert err.value.reason == Reason.QUOTE_INVALID


def test_outdated_quote_is_rejected_by_a_strict_policy() -> None:
    with pytest.raises(AttestationError) as err:
        verify_quote_file(
            *_files("tdx_quote_outdated"), at=_inside_window("tdx_quote_outdated"), policy=STRICT
        )
    assert err.value.reason == Reason.TCB_STATUS


def test_cloud_host_needs_dynamic_platform_allowed() -> None:
    with pytest.raises(AttestationError) as err:
        verify_quote_file(*_files("tdx_quote"), at=_inside_window("tdx_quote"), policy=STRICT)
    assert err.value.reason == Reason.PLATFORM


def test_collateral_is_expired_today() -> None:
    with pytest.raises(AttestationError) as err:
        verify_quote_file(*_files("tdx_quote"), at=datetime.now(UTC), policy=CLOUD)
    assert err.value.reason == Reason.COLLATERAL_EXPIRED


def test_real_quote_in_an_advert_fails_binding_to_keys_it_never_saw() -> None:
    quote = (FIXTURES / "tdx_quote").read_bytes()
    claims = verify_quote_file(*_files("tdx_quote"), at=_inside_window("tdx_quote"), policy=CLOUD)
    allow_this_image = AttestationPolicy(
        allowed_tcb_statuses=frozenset({"UpToDate"}),
        measurements=(MeasurementRule("sample", claims.mrtd, claims.rtmrs),),
        allow_dynamic_platform=True,
        allow_cached_keys=True,
        allow_smt=True,
    )
    verdict = EvidenceVerifier(allow_this_image).verify(
        Evidence(kind="tdx", blob=quote),
        peer_id="p",
        job_pub=bytes(32),
        peer_pub=bytes(32),
        now=_inside_window("tdx_quote").timestamp(),
        collateral=load_collateral_json(_files("tdx_quote")[1].read_text()),
    )
    assert not verdict.ok and verdict.reason == Reason.BINDING
