"""Provider-side helpers and the functions behind `meshnode attest` / `verify-quote`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import dcap_qvl
import trio

from meshnode.attest.collateral import load_collateral_json
from meshnode.attest.evidence import Evidence, EvidenceProducer, EvidenceUnavailableError
from meshnode.attest.tdx_tsm import DEFAULT_TSM_ROOT, QuoteGenerationError, TdxEvidenceProducer
from meshnode.attest.verifier import dcap_policy, verify_tdx_quote
from meshnode.core.attest_binding import (
    BindingInputs,
    epoch_at,
    gpu_evidence_hash,
    report_data_for,
)
from meshnode.core.attest_policy import RTMR_COUNT, AttestationPolicy, TdxClaims

# TDX quote generation goes guest -> host QGS -> QE; 30 s covers a cold QGS start.
QUOTE_TIMEOUT_S = 30.0
# Only one quote request at a time per process: configfs-tsm entries are shared state.
_quote_limiter = trio.CapacityLimiter(1)


async def make_evidence(
    producer: EvidenceProducer,
    job_pub: bytes,
    peer_pub: bytes,
    now: float,
    gpu_evidence: bytes | None = None,
    timeout_s: float = QUOTE_TIMEOUT_S,
) -> Evidence:
    """Evidence binding these keys (and the GPU evidence hash) for the epoch of `now`."""
    inputs = BindingInputs(job_pub, peer_pub, gpu_evidence_hash(gpu_evidence))
    report_data = report_data_for(inputs, epoch_at(now))
    with trio.fail_after(timeout_s):
        # Abandon a stuck configfs read (host QGS down) rather than hang past the timeout;
        # trio-stubs (trio_typing) shadows trio's own hints and predates this kwarg.
        evidence = await trio.to_thread.run_sync(  # type: ignore[call-arg]
            producer.produce, report_data, limiter=_quote_limiter, abandon_on_cancel=True
        )
    return replace(evidence, gpu_evidence=gpu_evidence)


@dataclass(frozen=True)
class LocalEvidenceReport:
    """What `meshnode attest` shows: can this machine produce TDX evidence, and what."""

    kind: str
    available: bool
    detail: str
    report_data: bytes | None = None
    quote: bytes | None = None
    measurements: dict[str, str] = field(default_factory=dict)

    def policy_snippet(self) -> str | None:
        """A [[measurements]] table for the attestation policy file."""
        if not self.measurements:
            return None
        lines = ["[[measurements]]", 'name = "this machine"']
        lines += [f'{k} = "{v}"' for k, v in self.measurements.items() if k != "td_attributes"]
        return "\n".join(lines)


def describe_local_evidence(
    job_pub: bytes,
    peer_pub: bytes,
    now: float,
    *,
    tsm_root: Path = DEFAULT_TSM_ROOT,
    entry_name: str | None = None,
    gpu_evidence: bytes | None = None,
) -> LocalEvidenceReport:
    """Blocking. Try to produce a TDX quote binding these keys and read its measurements."""
    inputs = BindingInputs(job_pub, peer_pub, gpu_evidence_hash(gpu_evidence))
    report_data = report_data_for(inputs, epoch_at(now))
    producer = TdxEvidenceProducer(tsm_root, entry_name)
    try:
        evidence = producer.produce(report_data)
    except (EvidenceUnavailableError, QuoteGenerationError, OSError) as exc:
        return LocalEvidenceReport(
            kind="dev",
            available=False,
            detail=f"no TDX evidence: {exc}. Only INSECURE `dev` evidence is possible here.",
            report_data=report_data,
        )
    return LocalEvidenceReport(
        kind="tdx",
        available=True,
        detail=f"TDX quote of {len(evidence.blob)} bytes via {producer.entry}",
        report_data=report_data,
        quote=evidence.blob,
        measurements=quote_measurements(evidence.blob),
    )


def quote_measurements(raw_quote: bytes) -> dict[str, str]:
    """MRTD, RTMR0-3 and TD attributes of a TDX quote, hex (no verification)."""
    report = dcap_qvl.parse_quote(raw_quote).report
    out = {"mrtd": bytes(report.mr_td).hex()}
    for i in range(RTMR_COUNT):
        out[f"rtmr{i}"] = bytes(getattr(report, f"rt_mr{i}")).hex()
    out["td_attributes"] = bytes(report.td_attributes).hex()
    return out


def verify_quote_file(
    quote_path: Path,
    collateral_path: Path,
    at: datetime | None = None,
    *,
    policy: AttestationPolicy | None = None,
    root_ca_der: bytes | None = None,
) -> TdxClaims:
    """Verify a quote file with a collateral JSON file at time `at` (default: now).

    Without a policy only cryptography, collateral validity and debug are checked and
    the TCB status is reported as found; with one, its TCB/platform rules apply too.
    Raises AttestationError (with a Reason code) or CollateralError.
    """
    raw_quote = quote_path.read_bytes()
    collateral = load_collateral_json(collateral_path.read_text())
    now = int((at or datetime.now().astimezone()).timestamp())
    dcap_pol: Any = (
        dcap_policy(policy, now) if policy is not None else dcap_qvl.QuotePolicy.claims_only(now)
    )
    return verify_tdx_quote(raw_quote, collateral, now, dcap_pol, root_ca_der)
