"""Minimal reproducers of fuzz findings in code owned elsewhere, as strict xfails.

Each one breaks the fuzz rule today (see fuzz_targets.KNOWN_BUGS for the owner and the
cause). When a fix lands the test passes unexpectedly and fails the run: then delete the
entry from KNOWN_BUGS, and the fuzz tests stop tolerating its signature.
"""

from __future__ import annotations

import pytest
from fuzz_targets import KNOWN_BUGS, TARGETS, Finding, KnownBug, check


def _params() -> list[object]:
    return [
        pytest.param(
            bug,
            id=bug.name,
            marks=pytest.mark.xfail(
                strict=True, raises=Finding, reason=f"{bug.owner}: {bug.summary}"
            ),
        )
        for bug in KNOWN_BUGS
    ]


@pytest.mark.parametrize("bug", _params())
def test_known_fuzz_finding_is_fixed(bug: KnownBug) -> None:
    for name in sorted(bug.targets):
        try:
            check(TARGETS[name], bug.reproducer)
        except Finding as finding:
            # The reproducer must still hit the bug it names, not a different one.
            assert finding.signature == bug.signature, finding.signature
            raise


def test_every_known_bug_names_real_targets() -> None:
    for bug in KNOWN_BUGS:
        assert bug.targets <= set(TARGETS), bug.name
