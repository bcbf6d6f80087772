"""The node's long-lived keys on disk: Ed25519 peer key and X25519 job key.

Created on first start in the data dir with mode 0600 and reused afterwards. A key file
that is corrupt or readable by others is an error the operator must resolve; replacing
it silently would change the node's identity (and strand its reputation and payments).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey
from nacl.signing import SigningKey

KEY_DIR = "keys"
PEER_KEY_FILE = "peer.ed25519"
JOB_KEY_FILE = "job.x25519"
_MAGIC = {PEER_KEY_FILE: "meshnode-ed25519-seed-v1", JOB_KEY_FILE: "meshnode-x25519-secret-v1"}
SEED_BYTES = 32
# Group/other bits: any of them set means someone else on the box can read our secrets.
_FORBIDDEN_MODE = stat.S_IRWXG | stat.S_IRWXO


class KeyFileError(Exception):
    """A key file exists but cannot be trusted; the message says how to fix it."""


def data_dir(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return explicit
    env = os.environ.get("MESHNODE_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "meshnode"


@dataclass(frozen=True)
class NodeIdentity:
    peer_seed: bytes
    job_secret: bytes

    @property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.peer_seed)

    @property
    def peer_public(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def job_key(self) -> PrivateKey:
        return PrivateKey(self.job_secret)

    @property
    def job_public(self) -> bytes:
        return bytes(self.job_key.public_key)

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(peer_seed=os.urandom(SEED_BYTES), job_secret=os.urandom(SEED_BYTES))


def _read_key(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & _FORBIDDEN_MODE:
        raise KeyFileError(
            f"{path} has mode {stat.S_IMODE(mode):o}; key files must be private. "
            f"Run: chmod 600 {path}"
        )
    magic = _MAGIC[path.name]
    try:
        text = path.read_text(encoding="ascii").split()
        if len(text) != 2 or text[0] != magic:
            raise ValueError("unexpected layout")
        raw = bytes.fromhex(text[1])
        if len(raw) != SEED_BYTES:
            raise ValueError(f"expected {SEED_BYTES} bytes, got {len(raw)}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(
            f"{path} is corrupt ({exc}). Restore it from a backup, or move it away to "
            "start this node with a new identity."
        ) from exc
    return raw


def _write_key(path: Path, raw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"{_MAGIC[path.name]} {raw.hex()}\n")
        f.flush()
        os.fsync(f.fileno())


def load_or_create(home: Path) -> tuple[NodeIdentity, bool]:
    """(identity, created). Raises KeyFileError for a key file we must not overwrite."""
    keys = home / KEY_DIR
    peer_path, job_path = keys / PEER_KEY_FILE, keys / JOB_KEY_FILE
    created = False
    fresh = NodeIdentity.generate()
    for path, raw in ((peer_path, fresh.peer_seed), (job_path, fresh.job_secret)):
        if not path.exists():
            _write_key(path, raw)
            created = True
    return NodeIdentity(peer_seed=_read_key(peer_path), job_secret=_read_key(job_path)), created
