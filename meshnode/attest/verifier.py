"""Verifier for provider evidence: dcap-qvl for the quote, core policy for the rest."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import dcap_qvl
import trio

from meshnode.attest.collateral import CollateralCache, collateral_next_update
from meshnode.attest.dev import parse_dev_statement
from meshnode.attest.evidence import KIND_DEV, KIND_TDX, Evidence, EvidenceError
from meshnode.core.attest_binding import (
    ACCEPTED_EPOCH_LAG,
    EPOCH_SECONDS,
    BindingInputs,
    gpu_evidence_hash,
)
from meshnode.core.attest_policy import (
    AttestationPolicy,
    Reason,
    TdxClaims,
    Verdict,
    decide_dev,
    decide_tdx,
)
from meshnode.core.errors import MeshnodeError

# Distinct (peer, evidence) pairs remembered; a large mesh has a few thousand providers.
RESULT_CACHE_SIZE = 4096
# A rejection is re-examined after 10 minutes: long enough to shed a peer that spams
# the same bad evidence, short enough that a fixed collateral/clock issue heals quickly.
NEGATIVE_CACHE_SECONDS = 600
# Verifying one quote costs ~1 ms of CPU; one at a time keeps the worker pool free.
VERIFY_THREADS = 1
# Failures that depend on fetchable state, not on the evidence: never cached.
_UNCACHED_REASONS = frozenset({Reason.COLLATERAL_MISSING, Reason.COLLATERAL_EXPIRED})
_DAY = 86400

# dcap-qvl reports every failure as ValueError text; these fragments give stable codes.
_ERROR_REASONS: tuple[tuple[str, str], ...] = (
    ("Debug mode", Reason.DEBUG),
    ("not acceptable by policy", Reason.TCB_STATUS),
    ("No matching TCB level", Reason.TCB_STATUS),
    ("TCB too old", Reason.TCB_STATUS),
    ("Revoked", Reason.TCB_STATUS),
    ("Advisory ID", Reason.ADVISORY),
    ("Dynamic platform", Reason.PLATFORM),
    ("Cached keys", Reason.PLATFORM),
    ("SMT", Reason.PLATFORM),
    ("Expired", Reason.COLLATERAL_EXPIRED),
    ("expired", Reason.COLLATERAL_EXPIRED),
    ("in the future", Reason.COLLATERAL_EXPIRED),
)


class AttestationError(MeshnodeError):
    """A quote failed verification; `reason` is a Reason code."""

    label = "verification failed"

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


def reason_for_dcap_error(message: str) -> str:
    for fragment, reason in _ERROR_REASONS:
        if fragment in message:
            return reason
    return Reason.QUOTE_INVALID


def dcap_policy(policy: AttestationPolicy, now: int) -> Any:
    """The part of our policy dcap-qvl enforces itself (TCB, advisories, platform)."""
    p = dcap_qvl.QuotePolicy.strict(now)
    for status in sorted(policy.allowed_tcb_statuses - {"UpToDate"}):
        p = p.allow_status(status)
    if policy.rejected_advisories:
        p = p.reject_advisories(sorted(policy.rejected_advisories))
    grace = policy.tcb_grace_days * _DAY
    return (
        p.allow_dynamic_platform(policy.allow_dynamic_platform)
        .allow_cached_keys(policy.allow_cached_keys)
        .allow_smt(policy.allow_smt)
        .platform_grace_period(grace)
        .qe_grace_period(grace)
    )


def _flag(value: object) -> bool | None:
    if value in (True, "True", "true"):
        return True
    if value in (False, "False", "false"):
        return False
    return None


def claims_from_quote(raw_quote: bytes, dcap_claims_json: str) -> TdxClaims:
    """TdxClaims from a quote dcap-qvl verified and the claims JSON it returned."""
    doc = json.loads(dcap_claims_json)
    report = dcap_qvl.parse_quote(raw_quote).report
    pck = doc.get("platform", {}).get("pck", {})
    tcb = doc.get("tcb", {})
    return TdxClaims(
        tcb_status=str(tcb.get("status", "Unknown")),
        advisories=tuple(str(a) for a in tcb.get("advisory_ids", [])),
        td_attributes=bytes(report.td_attributes),
        mrtd=bytes(report.mr_td),
        rtmrs=(
            bytes(report.rt_mr0),
            bytes(report.rt_mr1),
            bytes(report.rt_mr2),
            bytes(report.rt_mr3),
        ),
        report_data=bytes(report.report_data),
        dynamic_platform=_flag(pck.get("dynamic_platform")),
        cached_keys=_flag(pck.get("cached_keys")),
        smt_enabled=_flag(pck.get("smt_enabled")),
    )


def verify_tdx_quote(
    raw_quote: bytes, collateral: Any, now: int, dcap_pol: Any, root_ca_der: bytes | None
) -> TdxClaims:
    """Signatures, certificate chain, CRLs, TCB: raise AttestationError or return claims."""
    try:
        parsed = dcap_qvl.parse_quote(raw_quote)
    except ValueError as exc:
        raise AttestationError(Reason.QUOTE_INVALID, f"cannot parse quote: {exc}") from exc
    if not parsed.is_tdx():
        raise AttestationError(Reason.QUOTE_INVALID, f"not a TDX quote ({parsed.quote_type()})")
    try:
        verifier = dcap_qvl.QuoteVerifier(root_ca_der)
        result = verifier.verify_with_policy(raw_quote, collateral, now, dcap_pol)
    except ValueError as exc:
        raise AttestationError(reason_for_dcap_error(str(exc)), str(exc)) from exc
    return claims_from_quote(raw_quote, result.to_json())


class EvidenceVerifier:
    """Checks a provider's evidence against the policy and the keys in its advert.

    `root_ca_der` None means Intel's SGX root CA; tests pass their own.
    `allow_insecure` lets `dev` evidence through, flagged insecure=True.
    """

    def __init__(
        self,
        policy: AttestationPolicy,
        collateral: CollateralCache | None = None,
        *,
        root_ca_der: bytes | None = None,
        allow_insecure: bool = False,
        cache_size: int = RESULT_CACHE_SIZE,
    ) -> None:
        self.policy = policy
        self.collateral = collateral
        self.root_ca_der = root_ca_der
        self.allow_insecure = allow_insecure
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, bytes, bytes, bytes], tuple[Verdict, float]] = (
            OrderedDict()
        )
        self._limiter = trio.CapacityLimiter(VERIFY_THREADS)

    # ------------------------------------------------------------------ sync core

    def verify(
        self,
        evidence: Evidence,
        *,
        peer_id: str,
        job_pub: bytes,
        peer_pub: bytes,
        now: float,
        collateral: Any | None = None,
    ) -> Verdict:
        """Blocking, offline: uses `collateral` or the disk cache, never the network."""
        key = (peer_id, evidence.digest(), job_pub, peer_pub)
        hit = self._cache.get(key)
        if hit is not None and now < hit[1]:
            self._cache.move_to_end(key)
            return hit[0]
        verdict, valid_until = self._verify_uncached(evidence, job_pub, peer_pub, now, collateral)
        if verdict.reason not in _UNCACHED_REASONS:
            self._cache[key] = (verdict, valid_until)
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return verdict

    def _verify_uncached(
        self,
        evidence: Evidence,
        job_pub: bytes,
        peer_pub: bytes,
        now: float,
        collateral: Any | None,
    ) -> tuple[Verdict, float]:
        negative_until = now + NEGATIVE_CACHE_SECONDS
        try:
            inputs = BindingInputs(
                job_pub=job_pub,
                peer_pub=peer_pub,
                gpu_evidence_hash=gpu_evidence_hash(evidence.gpu_evidence),
            )
        except ValueError as exc:
            return Verdict.reject(Reason.MALFORMED, str(exc)), negative_until

        if evidence.kind == KIND_DEV:
            try:
                st = parse_dev_statement(evidence.blob)
            except EvidenceError as exc:
                return Verdict.reject(Reason.MALFORMED, str(exc)), negative_until
            verdict = decide_dev(
                st.report_data,
                st.peer_pub == peer_pub and st.signature_valid(),
                inputs,
                now,
                self.allow_insecure,
            )
            return verdict, _valid_until(verdict, now, negative_until, None)

        if evidence.kind != KIND_TDX:
            return (
                Verdict.reject(Reason.UNSUPPORTED_KIND, f"unsupported kind {evidence.kind!r}"),
                negative_until,
            )
        if collateral is None and self.collateral is not None:
            try:
                collateral = self.collateral.load(evidence.blob)
            except Exception as exc:  # a bad quote or corrupt cache file: same outcome
                return Verdict.reject(Reason.QUOTE_INVALID, str(exc)), negative_until
        if collateral is None:
            return (
                Verdict.reject(Reason.COLLATERAL_MISSING, "no cached collateral for this platform"),
                negative_until,
            )
        try:
            claims = verify_tdx_quote(
                evidence.blob,
                collateral,
                int(now),
                dcap_policy(self.policy, int(now)),
                self.root_ca_der,
            )
        except AttestationError as exc:
            return Verdict.reject(exc.reason, exc.message), negative_until
        verdict = decide_tdx(self.policy, claims, inputs, now)
        return verdict, _valid_until(verdict, now, negative_until, collateral)

    # ----------------------------------------------------------------- trio shell

    async def verify_async(
        self, evidence: Evidence, *, peer_id: str, job_pub: bytes, peer_pub: bytes, now: float
    ) -> Verdict:
        """Refreshes collateral from the PCCS if needed (bounded wait), then verifies."""
        collateral = None
        if evidence.kind == KIND_TDX and self.collateral is not None:
            try:
                collateral = await self.collateral.get(evidence.blob, now)
            except Exception as exc:  # parse failure of the quote itself
                return Verdict.reject(Reason.QUOTE_INVALID, str(exc))
        return await trio.to_thread.run_sync(
            lambda: self.verify(
                evidence,
                peer_id=peer_id,
                job_pub=job_pub,
                peer_pub=peer_pub,
                now=now,
                collateral=collateral,
            ),
            limiter=self._limiter,
        )


def _valid_until(verdict: Verdict, now: float, negative_until: float, collateral: Any) -> float:
    if not verdict.ok or verdict.epoch is None:
        return negative_until
    until = float((verdict.epoch + ACCEPTED_EPOCH_LAG + 1) * EPOCH_SECONDS)
    if collateral is not None:
        until = min(until, collateral_next_update(collateral))
    return until
