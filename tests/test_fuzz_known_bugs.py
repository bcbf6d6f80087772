"""Minimal reproducers of fuzz findings in code owned elsewhere, as strict xfails.

Each one in fuzz_targets.KNOWN_BUGS breaks the fuzz rule today (see the entry for the
owner and the cause). When a fix lands its test passes unexpectedly and fails the run:
then delete the entry, and the fuzz tests stop tolerating its signature. The findings
fixed so far stay below as plain regressions: their reproducers must keep passing.
"""

from __future__ import annotations

import msgpack
import pytest
from fuzz_targets import KNOWN_BUGS, TARGETS, Finding, KnownBug, check


def _pack(obj: object) -> bytes:
    out: bytes = msgpack.packb(obj, use_bin_type=True)
    return out


_LONG = "x" * 65536  # a 64 KiB name, as in the freeze

# (name, targets, reproducer) of every finding fixed since it was pinned (issue 13).
FIXED: tuple[tuple[str, frozenset[str], bytes], ...] = (
    ("job-message-mixed-key-types", frozenset({"job_messages", "job_stream"}),
     _pack({"t": "busy", "retry_after": 1.0, "x": 0, 0: 0})),
    ("job-message-unknown-type-unbounded-text", frozenset({"job_messages", "job_stream"}),
     _pack({"t": _LONG})),
    ("job-message-extra-keys-unbounded-text", frozenset({"job_messages", "job_stream"}),
     _pack({"t": "busy", "retry_after": 1.0, _LONG: 0})),
    ("channel-message-mixed-key-types", frozenset({"channel_messages"}),
     _pack({"t": "announced", "deposit": 5, "state_b": b"", "x": 0, 0: 0})),
    ("channel-message-keys-unbounded-text", frozenset({"channel_messages"}),
     _pack({"t": "announced", _LONG: 0})),
    ("channel-request-unknown-type-unbounded-text", frozenset({"channel_messages"}),
     _pack({"t": _LONG})),
    ("evidence-version-unbounded-text", frozenset({"evidence"}), _pack({"v": "x" * 40_000})),
    ("evidence-kind-unbounded-text", frozenset({"evidence"}),
     _pack({"v": 1, "kind": "x" * 40_000, "blob": b"a"})),
    ("api-chat-role-unhashable", frozenset({"api_chat"}),
     b'{"model": "tiny", "messages": [{"role": {}, "content": "hi"}]}'),
    ("api-nested-json-recursion", frozenset({"api_chat", "api_completion"}), b"[" * 100_000),
)


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


@pytest.mark.skipif(not KNOWN_BUGS, reason="no open fuzz findings: KNOWN_BUGS is empty")
@pytest.mark.parametrize("bug", _params() or [None])
def test_known_fuzz_finding_is_fixed(bug: KnownBug) -> None:
    for name in sorted(bug.targets):
        try:
            check(TARGETS[name], bug.reproducer)
        except Finding as finding:
            # The reproducer must still hit the bug it names, not a different one.
            assert finding.signature == bug.signature, finding.signature
            raise


def test_every_known_bug_names_real_targets_and_a_distinct_name() -> None:
    names = [bug.name for bug in KNOWN_BUGS]
    assert len(names) == len(set(names))
    for bug in KNOWN_BUGS:
        assert bug.targets <= set(TARGETS), bug.name
        assert bug.reproducer and bug.signature and bug.owner, bug.name


@pytest.mark.parametrize(("name", "targets", "reproducer"), FIXED, ids=[f[0] for f in FIXED])
def test_a_fixed_fuzz_finding_stays_fixed(
    name: str, targets: frozenset[str], reproducer: bytes
) -> None:
    for target in sorted(targets):
        check(TARGETS[target], reproducer)
