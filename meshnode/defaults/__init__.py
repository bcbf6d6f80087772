"""Files the package reads at run time, shipped inside it (package data, in the wheel and
the sdist), so an installed meshnode never reaches into a source checkout."""

from __future__ import annotations

from pathlib import Path

DEFAULTS_DIR = Path(__file__).resolve().parent
PEERS_PATH = DEFAULTS_DIR / "peers.toml"  # the default bootstrap peers
POLICY_PATH = DEFAULTS_DIR / "attestation-policy.toml"  # the default attestation policy
