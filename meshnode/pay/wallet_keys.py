"""Payment keys on disk: the channel signing key and the wallet key, 0600 files.

Same rules as the node identity (meshnode.identity): created once in the data dir's
``keys/`` folder with mode 0600, reused afterwards, and a file that is corrupt or
readable by others is an error for the operator, never silently replaced (a new channel
key would strand every open channel's deposit). The seeds never appear in reprs or logs.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from meshnode.core.voucher import SEED_BYTES, VoucherSigner

KEY_DIR = "keys"
CHANNEL_KEY_FILE = "channel.ed25519"
WALLET_KEY_FILE = "wallet.ed25519"
_MAGIC = {
    CHANNEL_KEY_FILE: "meshnode-channel-ed25519-seed-v1",
    WALLET_KEY_FILE: "meshnode-wallet-ed25519-seed-v1",
}
_FORBIDDEN_MODE = stat.S_IRWXG | stat.S_IRWXO
"""Any group/other bit means someone else on the box could read the seed."""


class PaymentKeyError(Exception):
    """A payment key file exists but cannot be trusted; the message says how to fix it."""


@dataclass(frozen=True)
class PaymentKeys:
    """Seeds for the channel key (signs vouchers and channel ops) and the wallet key."""

    channel_seed: bytes = field(repr=False)
    wallet_seed: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.channel_seed) != SEED_BYTES or len(self.wallet_seed) != SEED_BYTES:
            raise PaymentKeyError(f"payment key seeds must be {SEED_BYTES} bytes")

    @classmethod
    def generate(cls) -> PaymentKeys:
        return cls(channel_seed=os.urandom(SEED_BYTES), wallet_seed=os.urandom(SEED_BYTES))

    def channel_signer(self) -> VoucherSigner:
        return VoucherSigner(self.channel_seed)

    @property
    def channel_public(self) -> bytes:
        return self.channel_signer().public_key

    @property
    def wallet_public(self) -> bytes:
        return VoucherSigner(self.wallet_seed).public_key


def _read_seed(path: Path) -> bytes:
    mode = path.stat().st_mode
    if mode & _FORBIDDEN_MODE:
        raise PaymentKeyError(
            f"{path} has mode {stat.S_IMODE(mode):o}; key files must be private. "
            f"Run: chmod 600 {path}"
        )
    try:
        words = path.read_text(encoding="ascii").split()
        if len(words) != 2 or words[0] != _MAGIC[path.name]:
            raise ValueError("unexpected layout")
        raw = bytes.fromhex(words[1])
        if len(raw) != SEED_BYTES:
            raise ValueError(f"expected {SEED_BYTES} bytes, got {len(raw)}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise PaymentKeyError(
            f"{path} is corrupt ({exc}). Restore it from a backup: channels opened with "
            "this key can only be closed with it."
        ) from None  # the chained error could quote key material
    return raw


def _write_seed(path: Path, raw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(f"{_MAGIC[path.name]} {raw.hex()}\n")
        f.flush()
        os.fsync(f.fileno())


def load_or_create_payment_keys(home: Path) -> tuple[PaymentKeys, bool]:
    """(keys, created). Raises PaymentKeyError for a file we must not overwrite."""
    keys = home / KEY_DIR
    fresh = PaymentKeys.generate()
    created = False
    paths = (keys / CHANNEL_KEY_FILE, keys / WALLET_KEY_FILE)
    for path, raw in zip(paths, (fresh.channel_seed, fresh.wallet_seed), strict=True):
        if not path.exists():
            _write_seed(path, raw)
            created = True
    return PaymentKeys(_read_seed(paths[0]), _read_seed(paths[1])), created
