"""Secret key files: one `MAGIC HEX` line, mode 0600, created once and never replaced.

A file that is corrupt or readable by others is an error for the operator: replacing it
silently would change the node's identity or strand the funds its key controls.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from meshnode.core.errors import EXIT_USAGE, MeshnodeError

SEED_BYTES = 32
# Group/other bits: any of them set means someone else on the box can read our secrets.
_FORBIDDEN_MODE = stat.S_IRWXG | stat.S_IRWXO


class KeyFileError(MeshnodeError):
    """A key file exists but cannot be trusted; the message says how to fix it."""

    exit_code = EXIT_USAGE
    label = "key file problem"


def read_secret(path: Path, magic: str, *, if_corrupt: str) -> bytes:
    """The 32-byte secret in `path`; `if_corrupt` tells the operator what to do."""
    mode = path.stat().st_mode
    if mode & _FORBIDDEN_MODE:
        raise KeyFileError(
            f"{path} has mode {stat.S_IMODE(mode):o}; key files must be private. "
            f"Run: chmod 600 {path}"
        )
    try:
        words = path.read_text(encoding="ascii").split()
        if len(words) != 2 or words[0] != magic:
            raise ValueError("unexpected layout")
        raw = bytes.fromhex(words[1])
        if len(raw) != SEED_BYTES:
            raise ValueError(f"expected {SEED_BYTES} bytes, got {len(raw)}")
    except (ValueError, UnicodeDecodeError) as exc:
        # `from None`: the chained error could quote key material.
        raise KeyFileError(f"{path} is corrupt ({exc}). {if_corrupt}") from None
    return raw


def write_secret(path: Path, magic: str, raw: bytes) -> None:
    """Create `path` (never overwrite) with mode 0600, durably."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"{magic} {raw.hex()}\n")
        f.flush()
        os.fsync(f.fileno())


def load_or_create_secrets(files: dict[Path, tuple[str, bytes]], if_corrupt: str) -> tuple[
    list[bytes], bool
]:
    """For each path: (magic, fresh secret used if the file is missing). Returns the
    secrets in order and whether any file was created."""
    created = False
    for path, (magic, fresh) in files.items():
        if not path.exists():
            write_secret(path, magic, fresh)
            created = True
    secrets = [read_secret(p, magic, if_corrupt=if_corrupt) for p, (magic, _) in files.items()]
    return secrets, created
