"""Files read at run time ship inside the package, and an operator can replace the policy."""

from __future__ import annotations

from pathlib import Path

import pytest

import meshnode
from meshnode.attest.policy_file import DEFAULT_POLICY_PATH, POLICY_ENV, load_policy
from meshnode.bootstrap_peers import DEFAULT_PEERS_PATH, load_bootstrap_peers
from meshnode.core.attest_policy import PolicyError

PACKAGE = Path(meshnode.__file__).resolve().parent


def test_the_default_policy_and_peer_list_live_inside_the_package() -> None:
    for path in (DEFAULT_POLICY_PATH, DEFAULT_PEERS_PATH):
        assert path.is_relative_to(PACKAGE) and path.is_file()
    assert load_policy().allow_dev is False
    assert load_bootstrap_peers() == []


def test_meshnode_policy_names_the_operators_own_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    own = tmp_path / "policy.toml"
    own.write_text(DEFAULT_POLICY_PATH.read_text().replace("allow_dev = false",
                                                          "allow_dev = true"))
    monkeypatch.setenv(POLICY_ENV, str(own))
    assert load_policy().allow_dev is True
    own.write_text("version = 1\nallow_dev = 3\n")
    with pytest.raises(PolicyError, match=str(own)):
        load_policy()
