"""A blocking attestation check for ``Directory(attest=...)``: the same verifier and
policy a client uses, run before an advert is stored (a bootstrap node's directory).

Not verified here: anything needing the network. TDX evidence whose collateral is not in
the local cache cannot be decided offline and stays *pending* (it outranks failed
adverts, verified ones outrank it); a client fetches collateral and decides for itself.
"""

from __future__ import annotations

from pathlib import Path

from meshnode.attest.evidence import Evidence
from meshnode.attest.policy_file import load_policy
from meshnode.attest.verifier import EvidenceVerifier
from meshnode.core.advert import Advert
from meshnode.core.attest_policy import Reason
from meshnode.core.directory import AttestCheck, AttestVerdict, Verification

# Verdicts that say "cannot tell yet" rather than "bad evidence".
_UNDECIDED = frozenset({Reason.COLLATERAL_MISSING})


def advert_check(verifier: EvidenceVerifier) -> AttestCheck:
    """An ``AttestCheck`` that runs ``verifier`` (offline) on an advert's evidence."""

    def check(advert: Advert, now: float) -> AttestVerdict:
        try:
            evidence = Evidence.from_dict(advert.attestation)
        except Exception as exc:  # evidence is peer-controlled: any parse error rejects
            return AttestVerdict(Verification.FAILED, f"{Reason.MALFORMED}: {exc}")
        verdict = verifier.verify(
            evidence,
            peer_id=advert.peer_id,
            job_pub=advert.job_pubkey,
            peer_pub=advert.peer_pubkey,
            now=now,
        )
        if verdict.ok:
            state = Verification.VERIFIED
        elif verdict.reason in _UNDECIDED:
            state = Verification.PENDING
        else:
            state = Verification.FAILED
        return AttestVerdict(state, f"{verdict.reason}: {verdict.message}")

    return check


def policy_advert_check(
    policy_path: Path | None = None, *, allow_insecure: bool = False
) -> AttestCheck:
    """The check a node runs with its policy file (the packaged default if None);
    ``dev`` evidence passes only with ``allow_insecure`` or a policy that allows it."""
    policy = load_policy(policy_path)
    allow = allow_insecure or policy.allow_dev
    return advert_check(EvidenceVerifier(policy, allow_insecure=allow))
