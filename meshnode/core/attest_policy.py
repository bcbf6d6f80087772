"""Attestation policy: the model, its TOML loader, and the decision over verified claims.

Sans-io: the loader takes the file's text, the decision takes claims that the shell
verifier (meshnode.attest) extracted from a quote whose signatures and collateral it
already checked, plus the binding inputs and the current time as parameters.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshnode.core.attest_binding import (
    REPORT_DATA_LEN,
    BindingInputs,
    accepted_epochs,
    matching_epoch,
)
from meshnode.core.errors import EXIT_USAGE, MeshnodeError

# The only policy file format this code understands.
POLICY_VERSION = 1
# MRTD and RTMRs are SHA-384 digests.
MEASUREMENT_LEN = 48
# TD attributes field of the TDREPORT.
TD_ATTRIBUTES_LEN = 8
# TUD.DEBUG: bit 0 of the TD attributes; set means the host can read the TD's memory.
TD_ATTRIBUTES_DEBUG_BIT = 0x01
# The other TUD bits (rest of byte 0) are also "under debug"; any of them is refused.
TD_ATTRIBUTES_TUD_MASK = 0xFF
# Number of runtime measurement registers in a TDREPORT.
RTMR_COUNT = 4
# In a measurement rule, this value accepts any RTMR content (runtime-extended ones).
ANY_MEASUREMENT = "*"
# A policy with more rules than this is a mistake, not a deployment.
MAX_MEASUREMENT_RULES = 256
# Longest grace an operator may give an out-of-date TCB: past a year a platform has
# missed several Intel TCB recoveries and "temporarily tolerated" stops being true.
MAX_TCB_GRACE_DAYS = 365

# TCB statuses as Intel PCS / dcap-qvl spell them; "Revoked" can never be allowed.
KNOWN_TCB_STATUSES = frozenset(
    {
        "UpToDate",
        "SWHardeningNeeded",
        "ConfigurationNeeded",
        "ConfigurationAndSWHardeningNeeded",
        "OutOfDate",
        "OutOfDateConfigurationNeeded",
    }
)
_ADVISORY_RE = re.compile(r"^INTEL-SA-\d{5}$")
_HEX_MEASUREMENT_RE = re.compile(rf"^[0-9a-fA-F]{{{MEASUREMENT_LEN * 2}}}$")


class Reason:
    """Stable short codes for a Verdict; tests and logs match on these, never on text."""

    OK = "ok"
    DEV = "dev"
    UNSUPPORTED_KIND = "unsupported_kind"
    MALFORMED = "malformed"
    QUOTE_INVALID = "quote_invalid"
    COLLATERAL_MISSING = "collateral_missing"
    COLLATERAL_EXPIRED = "collateral_expired"
    TCB_STATUS = "tcb_status"
    ADVISORY = "advisory"
    PLATFORM = "platform"
    DEBUG = "debug"
    MEASUREMENT = "measurement"
    BINDING = "binding"


class PolicyError(MeshnodeError, ValueError):
    """The policy file is invalid; names the key and, where known, the line."""

    exit_code = EXIT_USAGE
    label = "bad attestation policy"

    def __init__(self, source: str, key: str, line: int | None, problem: str) -> None:
        self.source = source
        self.key = key
        self.line = line
        self.problem = problem
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {key}: {problem}")


@dataclass(frozen=True)
class MeasurementRule:
    """One allowed TD image: its MRTD and RTMR0-3 (None = any value for that RTMR)."""

    name: str
    mrtd: bytes
    rtmrs: tuple[bytes | None, bytes | None, bytes | None, bytes | None]

    def matches(self, mrtd: bytes, rtmrs: tuple[bytes, ...]) -> bool:
        if mrtd != self.mrtd or len(rtmrs) != RTMR_COUNT:
            return False
        return all(want is None or want == got for want, got in zip(self.rtmrs, rtmrs, strict=True))


@dataclass(frozen=True)
class AttestationPolicy:
    """What a client accepts from a TDX provider."""

    allowed_tcb_statuses: frozenset[str]
    measurements: tuple[MeasurementRule, ...]
    rejected_advisories: frozenset[str] = frozenset()
    allow_dynamic_platform: bool = False
    allow_cached_keys: bool = False
    allow_smt: bool = False
    # Providers without a TEE (dev evidence). Off in any real policy: a dev provider can
    # read every prompt. A client's --insecure flag allows them too, per run.
    allow_dev: bool = False
    tcb_grace_days: int = 0
    pccs_url: str = "https://api.trustedservices.intel.com"
    version: int = POLICY_VERSION


@dataclass(frozen=True)
class TdxClaims:
    """Values read from a TDX quote whose signature chain and collateral checked out."""

    tcb_status: str
    advisories: tuple[str, ...]
    td_attributes: bytes
    mrtd: bytes
    rtmrs: tuple[bytes, bytes, bytes, bytes]
    report_data: bytes
    dynamic_platform: bool | None = None
    cached_keys: bool | None = None
    smt_enabled: bool | None = None

    @property
    def debug(self) -> bool:
        return bool(self.td_attributes[0] & TD_ATTRIBUTES_TUD_MASK)

    def to_dict(self) -> dict[str, Any]:
        """Hex-encoded, JSON-friendly view (for `meshnode verify-quote` and logs)."""
        return {
            "tcb_status": self.tcb_status,
            "advisories": list(self.advisories),
            "td_attributes": self.td_attributes.hex(),
            "debug": self.debug,
            "mrtd": self.mrtd.hex(),
            "rtmr0": self.rtmrs[0].hex(),
            "rtmr1": self.rtmrs[1].hex(),
            "rtmr2": self.rtmrs[2].hex(),
            "rtmr3": self.rtmrs[3].hex(),
            "report_data": self.report_data.hex(),
            "dynamic_platform": self.dynamic_platform,
            "cached_keys": self.cached_keys,
            "smt_enabled": self.smt_enabled,
        }


@dataclass(frozen=True)
class Verdict:
    """Outcome of verifying one provider's evidence."""

    ok: bool
    reason: str
    message: str
    claims: TdxClaims | None = None
    insecure: bool = False
    epoch: int | None = None

    @classmethod
    def reject(cls, reason: str, message: str, claims: TdxClaims | None = None) -> Verdict:
        return cls(ok=False, reason=reason, message=message, claims=claims)


# ---------------------------------------------------------------------------- loading


def _line_index(text: str) -> dict[str, int]:
    """Map key paths ("version", "measurements[1]", "measurements[1].mrtd") to lines.

    tomllib reports no positions for values, so this small scan of the subset of TOML a
    policy uses (top-level keys, [[measurements]] tables) lets errors name the line.
    """
    index: dict[str, int] = {}
    counts: dict[str, int] = {}
    prefix = ""
    key_re = re.compile(r'^\s*("?)([A-Za-z0-9_-]+)\1\s*=')
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("[["):
            name = line.strip("[] \t").split("#")[0].strip()
            n = counts.get(name, 0)
            counts[name] = n + 1
            prefix = f"{name}[{n}]"
            index.setdefault(prefix, lineno)
        elif line.startswith("["):
            prefix = line.strip("[] \t").split("#")[0].strip()
            index.setdefault(prefix, lineno)
        else:
            m = key_re.match(line)
            if m:
                path = f"{prefix}.{m.group(2)}" if prefix else m.group(2)
                index.setdefault(path, lineno)
    return index


class _Loader:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines = _line_index(text)

    def error(self, key: str, problem: str) -> PolicyError:
        line = self.lines.get(key)
        if line is None and "." in key:
            line = self.lines.get(key.rsplit(".", 1)[0])
        return PolicyError(self.source, key, line, problem)

    def check_keys(self, table: Mapping[str, Any], allowed: set[str], path: str) -> None:
        for key in table:
            full = f"{path}.{key}" if path else key
            if key not in allowed:
                raise self.error(full, f"unknown key (allowed: {', '.join(sorted(allowed))})")

    def require(self, table: Mapping[str, Any], key: str, typ: type, path: str = "") -> Any:
        full = f"{path}.{key}" if path else key
        if key not in table:
            raise self.error(full, "missing required key")
        return self.typed(table[key], typ, full)

    def typed(self, value: Any, typ: type, full: str) -> Any:
        # bool is an int subclass in Python; a policy must not take `true` for a number.
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise self.error(full, f"must be {typ.__name__}, got {type(value).__name__}")
        return value

    def measurement(self, value: Any, full: str, wildcard_ok: bool) -> bytes | None:
        self.typed(value, str, full)
        if value == ANY_MEASUREMENT:
            if not wildcard_ok:
                raise self.error(full, f"'{ANY_MEASUREMENT}' is not allowed here")
            return None
        if not _HEX_MEASUREMENT_RE.match(value):
            raise self.error(
                full,
                f"must be {MEASUREMENT_LEN * 2} hex characters"
                + (f" or '{ANY_MEASUREMENT}'" if wildcard_ok else ""),
            )
        return bytes.fromhex(value)


_TOP_KEYS = {
    "version",
    "allowed_tcb_statuses",
    "rejected_advisories",
    "allow_dynamic_platform",
    "allow_cached_keys",
    "allow_smt",
    "allow_dev",
    "tcb_grace_days",
    "pccs_url",
    "measurements",
}
_RULE_KEYS = {"name", "mrtd", *(f"rtmr{i}" for i in range(RTMR_COUNT))}


def parse_policy(text: str, source: str = "<policy>") -> AttestationPolicy:
    """Parse and validate a TOML policy; raises PolicyError naming the bad key/line."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"line (\d+)", str(exc))
        raise PolicyError(source, "<syntax>", int(m.group(1)) if m else None, str(exc)) from exc
    ld = _Loader(text, source)
    ld.check_keys(doc, _TOP_KEYS, "")

    version = ld.require(doc, "version", int)
    if version != POLICY_VERSION:
        raise ld.error("version", f"unsupported version {version} (expected {POLICY_VERSION})")

    statuses = ld.require(doc, "allowed_tcb_statuses", list)
    if not statuses:
        raise ld.error("allowed_tcb_statuses", "must list at least one status")
    for s in statuses:
        ld.typed(s, str, "allowed_tcb_statuses")
        if s not in KNOWN_TCB_STATUSES:
            raise ld.error(
                "allowed_tcb_statuses",
                f"unknown or forbidden status {s!r} "
                f"(known: {', '.join(sorted(KNOWN_TCB_STATUSES))})",
            )

    advisories = doc.get("rejected_advisories", [])
    ld.typed(advisories, list, "rejected_advisories")
    for a in advisories:
        ld.typed(a, str, "rejected_advisories")
        if not _ADVISORY_RE.match(a):
            raise ld.error("rejected_advisories", f"{a!r} is not an id like INTEL-SA-00334")

    flags = {}
    for flag in ("allow_dynamic_platform", "allow_cached_keys", "allow_smt", "allow_dev"):
        flags[flag] = ld.typed(doc.get(flag, False), bool, flag)

    grace = ld.typed(doc.get("tcb_grace_days", 0), int, "tcb_grace_days")
    if not 0 <= grace <= MAX_TCB_GRACE_DAYS:
        raise ld.error("tcb_grace_days", f"must be between 0 and {MAX_TCB_GRACE_DAYS}")

    pccs_url = ld.typed(doc.get("pccs_url", AttestationPolicy.pccs_url), str, "pccs_url")
    if not re.match(r"^https?://[^\s/]+", pccs_url):
        raise ld.error("pccs_url", f"must be an http(s) URL, got {pccs_url!r}")

    raw_rules = ld.typed(doc.get("measurements", []), list, "measurements")
    if len(raw_rules) > MAX_MEASUREMENT_RULES:
        raise ld.error("measurements", f"at most {MAX_MEASUREMENT_RULES} rules")
    rules = []
    for i, raw in enumerate(raw_rules):
        path = f"measurements[{i}]"
        ld.typed(raw, dict, path)
        ld.check_keys(raw, _RULE_KEYS, path)
        name = ld.require(raw, "name", str, path)
        mrtd = ld.measurement(ld.require(raw, "mrtd", str, path), f"{path}.mrtd", False)
        assert mrtd is not None  # wildcard refused above
        rtmrs = tuple(
            ld.measurement(ld.require(raw, f"rtmr{r}", str, path), f"{path}.rtmr{r}", True)
            for r in range(RTMR_COUNT)
        )
        rules.append(MeasurementRule(name=name, mrtd=mrtd, rtmrs=rtmrs))  # type: ignore[arg-type]

    return AttestationPolicy(
        version=version,
        allowed_tcb_statuses=frozenset(statuses),
        rejected_advisories=frozenset(advisories),
        measurements=tuple(rules),
        pccs_url=pccs_url,
        tcb_grace_days=grace,
        **flags,
    )


# --------------------------------------------------------------------------- decision


def decide_tdx(
    policy: AttestationPolicy, claims: TdxClaims, inputs: BindingInputs, now: float
) -> Verdict:
    """Apply the policy to claims from a cryptographically verified TDX quote."""
    if len(claims.td_attributes) != TD_ATTRIBUTES_LEN or len(claims.report_data) != REPORT_DATA_LEN:
        return Verdict.reject(Reason.MALFORMED, "claims have wrong field sizes", claims)
    if claims.debug:
        return Verdict.reject(
            Reason.DEBUG, f"TD runs in debug mode (attributes {claims.td_attributes.hex()})", claims
        )
    if claims.tcb_status not in policy.allowed_tcb_statuses:
        return Verdict.reject(
            Reason.TCB_STATUS,
            f"TCB status {claims.tcb_status} not in {sorted(policy.allowed_tcb_statuses)}",
            claims,
        )
    bad = sorted(set(claims.advisories) & policy.rejected_advisories)
    if bad:
        return Verdict.reject(Reason.ADVISORY, f"platform affected by {', '.join(bad)}", claims)
    for flag, allowed, label in (
        (claims.dynamic_platform, policy.allow_dynamic_platform, "dynamic platform"),
        (claims.cached_keys, policy.allow_cached_keys, "cached keys"),
        (claims.smt_enabled, policy.allow_smt, "SMT"),
    ):
        if flag and not allowed:
            return Verdict.reject(Reason.PLATFORM, f"{label} not allowed by policy", claims)
    if not any(rule.matches(claims.mrtd, claims.rtmrs) for rule in policy.measurements):
        return Verdict.reject(
            Reason.MEASUREMENT,
            f"MRTD {claims.mrtd.hex()[:16]}… with its RTMRs is not in the policy allowlist"
            + (" (the allowlist is empty)" if not policy.measurements else ""),
            claims,
        )
    epoch = matching_epoch(claims.report_data, inputs, accepted_epochs(now))
    if epoch is None:
        return Verdict.reject(
            Reason.BINDING,
            "report_data does not bind this peer's keys in an accepted epoch",
            claims,
        )
    return Verdict(
        ok=True, reason=Reason.OK, message="TDX evidence accepted", claims=claims, epoch=epoch
    )


def decide_dev(
    statement_report_data: bytes,
    signature_valid: bool,
    inputs: BindingInputs,
    now: float,
    allow_insecure: bool,
) -> Verdict:
    """Decide on `dev` evidence (no TEE): refused unless the caller allows insecure."""
    if not signature_valid:
        return Verdict.reject(Reason.MALFORMED, "dev statement signature is invalid")
    if len(statement_report_data) != REPORT_DATA_LEN:
        return Verdict.reject(Reason.MALFORMED, "dev statement has wrong report_data size")
    epoch = matching_epoch(statement_report_data, inputs, accepted_epochs(now))
    if epoch is None:
        return Verdict.reject(
            Reason.BINDING, "dev statement does not bind this peer's keys in an accepted epoch"
        )
    if not allow_insecure:
        return Verdict.reject(Reason.DEV, "provider runs without a TEE (dev evidence); insecure")
    return Verdict(
        ok=True,
        reason=Reason.DEV,
        message="INSECURE: dev evidence accepted (no TEE, the provider can read prompts)",
        insecure=True,
        epoch=epoch,
    )
