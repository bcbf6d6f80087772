"""Node keys: created once with mode 0600, reused, never silently replaced."""

import os
import stat
from pathlib import Path

import pytest

from meshnode.identity import JOB_KEY_FILE, KEY_DIR, PEER_KEY_FILE, KeyFileError, load_or_create


def test_created_private_and_reused(tmp_path: Path) -> None:
    first, created = load_or_create(tmp_path)
    assert created
    for name in (PEER_KEY_FILE, JOB_KEY_FILE):
        assert stat.S_IMODE((tmp_path / KEY_DIR / name).stat().st_mode) == 0o600
    again, created_again = load_or_create(tmp_path)
    assert again == first and not created_again


def test_world_readable_key_is_an_error(tmp_path: Path) -> None:
    load_or_create(tmp_path)
    path = tmp_path / KEY_DIR / PEER_KEY_FILE
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create(tmp_path)


def test_corrupt_key_is_an_error_and_kept(tmp_path: Path) -> None:
    load_or_create(tmp_path)
    path = tmp_path / KEY_DIR / JOB_KEY_FILE
    path.write_text("garbage")
    with pytest.raises(KeyFileError, match="corrupt"):
        load_or_create(tmp_path)
    assert path.read_text() == "garbage"
