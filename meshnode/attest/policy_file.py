"""Reading the attestation policy file (validation lives in core.attest_policy)."""

from __future__ import annotations

import os
from pathlib import Path

from meshnode.core.attest_policy import AttestationPolicy, PolicyError, parse_policy
from meshnode.defaults import POLICY_PATH

# The policy shipped with the package (meshnode/defaults/, package data).
DEFAULT_POLICY_PATH = POLICY_PATH
# An operator's own policy (pinned measurements) for every command and service that
# verifies providers, without editing the installed package.
POLICY_ENV = "MESHNODE_POLICY"
# A policy is a few KB even with many rules; refuse to read anything huge.
MAX_POLICY_FILE_BYTES = 256 * 1024


def load_policy(path: Path | None = None) -> AttestationPolicy:
    """Load and validate a policy (`path`, else $MESHNODE_POLICY, else the packaged
    default); PolicyError names the file, line and key."""
    path = path or Path(os.environ.get(POLICY_ENV) or DEFAULT_POLICY_PATH)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise PolicyError(str(path), "<file>", None, f"cannot read: {exc.strerror}") from exc
    if size > MAX_POLICY_FILE_BYTES:
        raise PolicyError(str(path), "<file>", None, f"larger than {MAX_POLICY_FILE_BYTES} bytes")
    return parse_policy(path.read_text(encoding="utf-8"), source=str(path))
