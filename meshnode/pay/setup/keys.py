"""Payment keys on disk: the channel signing key and the wallet key, 0600 files.

Same rules as the node identity (meshnode.identity): created once in the data dir's
``keys/`` folder with mode 0600, reused afterwards, and a file that is corrupt or
readable by others is an error for the operator, never silently replaced (a new channel
key would strand every open channel's deposit). The seeds never appear in reprs or logs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from meshnode.core.voucher import SEED_BYTES, VoucherSigner
from meshnode.keyfile import KeyFileError, load_or_create_secrets

KEY_DIR = "keys"
CHANNEL_KEY_FILE = "channel.ed25519"
WALLET_KEY_FILE = "wallet.ed25519"
_MAGIC = {
    CHANNEL_KEY_FILE: "meshnode-channel-ed25519-seed-v1",
    WALLET_KEY_FILE: "meshnode-wallet-ed25519-seed-v1",
}


class PaymentKeyError(KeyFileError):
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


def load_or_create_payment_keys(home: Path) -> tuple[PaymentKeys, bool]:
    """(keys, created). Raises PaymentKeyError for a file we must not overwrite."""
    keys = home / KEY_DIR
    fresh = PaymentKeys.generate()
    try:
        (channel, wallet), created = load_or_create_secrets(
            {
                keys / CHANNEL_KEY_FILE: (_MAGIC[CHANNEL_KEY_FILE], fresh.channel_seed),
                keys / WALLET_KEY_FILE: (_MAGIC[WALLET_KEY_FILE], fresh.wallet_seed),
            },
            if_corrupt="Restore it from a backup: channels opened with this key can only "
            "be closed with it.",
        )
    except KeyFileError as exc:
        raise PaymentKeyError(str(exc)) from None
    return PaymentKeys(channel, wallet), created
