"""The node's long-lived keys on disk: Ed25519 peer key and X25519 job key.

Created on first start in the data dir with mode 0600 and reused afterwards. A key file
that is corrupt or readable by others is an error the operator must resolve; replacing
it silently would change the node's identity (and strand its reputation and payments).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from meshnode.keyfile import SEED_BYTES, KeyFileError, load_or_create_secrets

__all__ = ["KeyFileError", "NodeIdentity", "data_dir", "load_or_create"]

KEY_DIR = "keys"
PEER_KEY_FILE = "peer.ed25519"
JOB_KEY_FILE = "job.x25519"
_MAGIC = {PEER_KEY_FILE: "meshnode-ed25519-seed-v1", JOB_KEY_FILE: "meshnode-x25519-secret-v1"}


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


def load_or_create(home: Path) -> tuple[NodeIdentity, bool]:
    """(identity, created). Raises KeyFileError for a key file we must not overwrite."""
    keys = home / KEY_DIR
    fresh = NodeIdentity.generate()
    (peer, job), created = load_or_create_secrets(
        {
            keys / PEER_KEY_FILE: (_MAGIC[PEER_KEY_FILE], fresh.peer_seed),
            keys / JOB_KEY_FILE: (_MAGIC[JOB_KEY_FILE], fresh.job_secret),
        },
        if_corrupt="Restore it from a backup, or move it away to start this node with a "
        "new identity.",
    )
    return NodeIdentity(peer_seed=peer, job_secret=job), created
