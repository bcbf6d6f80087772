"""Attestation policy: TOML validation that points at the bad key/line, and the
decision over verified TDX claims."""

from dataclasses import replace

import pytest

from meshnode.attest.policy_file import DEFAULT_POLICY_PATH, load_policy
from meshnode.core.attest_binding import BindingInputs, epoch_at, report_data_for
from meshnode.core.attest_policy import (
    AttestationPolicy,
    MeasurementRule,
    PolicyError,
    Reason,
    TdxClaims,
    decide_tdx,
    parse_policy,
)

M = "ab" * 48
GOOD = f"""\
version = 1
allowed_tcb_statuses = ["UpToDate"]
allow_dynamic_platform = true

[[measurements]]
name = "first"
mrtd = "{M}"
rtmr0 = "{M}"
rtmr1 = "{M}"
rtmr2 = "{M}"
rtmr3 = "*"

[[measurements]]
name = "second"
mrtd = "{M}"
rtmr0 = "{M}"
rtmr1 = "{M}"
rtmr2 = "{M}"
rtmr3 = "{M}"
"""


def _line_of(text: str, needle: str, occurrence: int = 1) -> int:
    seen = 0
    for n, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return n
    raise AssertionError(needle)


def test_shipped_default_policy_is_valid() -> None:
    policy = load_policy(DEFAULT_POLICY_PATH)
    assert "UpToDate" in policy.allowed_tcb_statuses
    assert policy.pccs_url.startswith("https://")


def test_valid_policy_parses_rules_and_wildcards() -> None:
    policy = parse_policy(GOOD)
    assert [r.name for r in policy.measurements] == ["first", "second"]
    assert policy.measurements[0].rtmrs[3] is None
    assert policy.measurements[1].rtmrs[3] == bytes.fromhex(M)
    assert policy.allow_dynamic_platform and not policy.allow_smt


def test_unknown_top_level_key_names_key_and_line() -> None:
    text = GOOD.replace("allow_dynamic_platform", "allow_dynamik_platform")
    with pytest.raises(PolicyError) as err:
        parse_policy(text, source="p.toml")
    assert err.value.key == "allow_dynamik_platform"
    assert err.value.line == _line_of(text, "allow_dynamik_platform")
    assert str(err.value).startswith(f"p.toml:{err.value.line}: allow_dynamik_platform")


def test_bad_measurement_in_second_rule_names_that_rule_and_line() -> None:
    text = GOOD[: GOOD.rindex("rtmr2")] + GOOD[GOOD.rindex("rtmr2") :].replace(M, "zz", 1)
    with pytest.raises(PolicyError) as err:
        parse_policy(text)
    assert err.value.key == "measurements[1].rtmr2"
    assert err.value.line == _line_of(text, "rtmr2", occurrence=2)
    assert "96 hex characters" in err.value.problem


def test_missing_key_in_rule_points_at_its_table() -> None:
    text = GOOD.replace('rtmr1 = "' + M + '"\n', "", 1)
    with pytest.raises(PolicyError) as err:
        parse_policy(text)
    assert err.value.key == "measurements[0].rtmr1"
    assert err.value.line == _line_of(text, "[[measurements]]")


def test_wildcard_mrtd_is_refused() -> None:
    text = GOOD.replace(f'mrtd = "{M}"', 'mrtd = "*"', 1)
    with pytest.raises(PolicyError, match=r"measurements\[0\]\.mrtd: '\*' is not allowed"):
        parse_policy(text)


def test_revoked_status_cannot_be_allowed() -> None:
    text = GOOD.replace('["UpToDate"]', '["UpToDate", "Revoked"]')
    with pytest.raises(PolicyError) as err:
        parse_policy(text)
    assert err.value.key == "allowed_tcb_statuses" and err.value.line == 2


def test_boolean_is_not_accepted_as_version_number() -> None:
    with pytest.raises(PolicyError, match="version: must be int, got bool"):
        parse_policy(GOOD.replace("version = 1", "version = true"))


def test_toml_syntax_error_reports_its_line() -> None:
    text = GOOD.replace('name = "second"', 'name = "second')
    with pytest.raises(PolicyError) as err:
        parse_policy(text)
    assert err.value.line == _line_of(text, 'name = "second')


def test_grace_period_is_bounded() -> None:
    with pytest.raises(PolicyError, match="tcb_grace_days"):
        parse_policy(GOOD.replace("version = 1", "version = 1\ntcb_grace_days = 9999"))


# ---------------------------------------------------------------------- decision

NOW = 1_750_000_000.0
INPUTS = BindingInputs(bytes(range(32)), bytes(range(32, 64)))
MRTD = bytes([1]) * 48
RTMRS = (bytes([2]) * 48, bytes([3]) * 48, bytes([4]) * 48, bytes([5]) * 48)
POLICY = AttestationPolicy(
    allowed_tcb_statuses=frozenset({"UpToDate"}),
    measurements=(MeasurementRule("img", MRTD, (RTMRS[0], RTMRS[1], RTMRS[2], None)),),
    rejected_advisories=frozenset({"INTEL-SA-00837"}),
)
CLAIMS = TdxClaims(
    tcb_status="UpToDate",
    advisories=(),
    td_attributes=(1 << 28).to_bytes(8, "little"),
    mrtd=MRTD,
    rtmrs=RTMRS,
    report_data=report_data_for(INPUTS, epoch_at(NOW)),
)


def test_claims_that_meet_the_policy_are_accepted_with_their_epoch() -> None:
    verdict = decide_tdx(POLICY, CLAIMS, INPUTS, NOW)
    assert verdict.ok and verdict.reason == Reason.OK and verdict.epoch == epoch_at(NOW)
    assert not verdict.insecure


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"td_attributes": ((1 << 28) | 1).to_bytes(8, "little")}, Reason.DEBUG),
        ({"tcb_status": "SWHardeningNeeded"}, Reason.TCB_STATUS),
        ({"advisories": ("INTEL-SA-00837",)}, Reason.ADVISORY),
        ({"dynamic_platform": True}, Reason.PLATFORM),
        ({"mrtd": bytes(48)}, Reason.MEASUREMENT),
        ({"rtmrs": (bytes(48), RTMRS[1], RTMRS[2], RTMRS[3])}, Reason.MEASUREMENT),
        ({"report_data": report_data_for(INPUTS, epoch_at(NOW) - 2)}, Reason.BINDING),
        ({"report_data": bytes(64)}, Reason.BINDING),
    ],
    ids=["debug", "tcb", "advisory", "dynamic", "mrtd", "rtmr0", "stale epoch", "other data"],
)
def test_each_policy_violation_has_its_reason(change: dict[str, object], reason: str) -> None:
    verdict = decide_tdx(POLICY, replace(CLAIMS, **change), INPUTS, NOW)  # type: ignore[arg-type]
    assert not verdict.ok and verdict.reason == reason


def test_wildcard_rtmr_accepts_any_value() -> None:
    claims = replace(CLAIMS, rtmrs=(*RTMRS[:3], bytes([9]) * 48))
    assert decide_tdx(POLICY, claims, INPUTS, NOW).ok


def test_empty_allowlist_rejects_every_measurement_and_says_so() -> None:
    verdict = decide_tdx(replace(POLICY, measurements=()), CLAIMS, INPUTS, NOW)
    assert verdict.reason == Reason.MEASUREMENT and "empty" in verdict.message
