"""Payment keys live in private files, are reused across starts, and never leak."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from meshnode.pay.setup.keys import (
    CHANNEL_KEY_FILE,
    KEY_DIR,
    PaymentKeyError,
    load_or_create_payment_keys,
)


def test_keys_are_created_private_and_reused(tmp_path: Path) -> None:
    first, created = load_or_create_payment_keys(tmp_path)
    again, created_again = load_or_create_payment_keys(tmp_path)
    assert created and not created_again
    assert again == first
    for path in (tmp_path / KEY_DIR).iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_channel_and_wallet_keys_differ(tmp_path: Path) -> None:
    keys, _ = load_or_create_payment_keys(tmp_path)
    assert keys.channel_public != keys.wallet_public


def test_seeds_do_not_appear_in_the_repr(tmp_path: Path) -> None:
    keys, _ = load_or_create_payment_keys(tmp_path)
    text = repr(keys) + str(keys)
    assert keys.channel_seed.hex() not in text and keys.wallet_seed.hex() not in text


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create_payment_keys(tmp_path)
    os.chmod(tmp_path / KEY_DIR / CHANNEL_KEY_FILE, 0o644)
    with pytest.raises(PaymentKeyError, match="chmod 600"):
        load_or_create_payment_keys(tmp_path)


def test_a_corrupt_key_file_is_refused_not_replaced(tmp_path: Path) -> None:
    load_or_create_payment_keys(tmp_path)
    path = tmp_path / KEY_DIR / CHANNEL_KEY_FILE
    path.write_text("meshnode-channel-ed25519-seed-v1 zz\n")
    with pytest.raises(PaymentKeyError, match="corrupt"):
        load_or_create_payment_keys(tmp_path)
    assert "zz" in path.read_text()
