"""Binding of a provider's keys into the 64-byte TDX ``report_data`` (sans-io).

report_data = SHA-512(domain tag ‖ lp(job X25519 pub) ‖ lp(peer Ed25519 pub)
                      ‖ lp(hash of GPU evidence) ‖ lp(epoch as uint64))

where ``lp(x)`` is a 4-byte big-endian length followed by ``x``. Length prefixes keep
the encoding injective even if a field ever changes size. The epoch makes a quote go
stale: a verifier accepts only the current epoch and its neighbours, so an evidence
blob lifted from an old advert stops verifying after about two epochs.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Iterable
from dataclasses import dataclass

# Names the protocol and its version so a digest made for anything else never collides.
BINDING_DOMAIN_TAG = b"meshnode/attest/report-data/v1"
# TDX TDREPORT report_data is exactly 64 bytes; SHA-512 fills it.
REPORT_DATA_LEN = 64
# Raw X25519 public key size (libsodium crypto_box).
X25519_PUB_LEN = 32
# Raw Ed25519 public key size (libp2p peer key).
ED25519_PUB_LEN = 32
# SHA-256 of the GPU evidence; 32 zero bytes stand for "no GPU evidence".
GPU_EVIDENCE_HASH_LEN = 32
NO_GPU_EVIDENCE_HASH = bytes(GPU_EVIDENCE_HASH_LEN)
# One hour: a provider re-quotes once per epoch (a quote costs ~100 ms), and a replayed
# quote is useless after at most two epochs.
EPOCH_SECONDS = 3600
# Accept the previous epoch: an advert issued just before a boundary stays valid for
# the rest of its TTL without forcing every provider to re-quote at the same instant.
ACCEPTED_EPOCH_LAG = 1
# Accept the next epoch: tolerates a verifier clock that runs behind the provider's.
ACCEPTED_EPOCH_LEAD = 1
# Largest value a uint64 epoch field can hold.
_MAX_EPOCH = 2**64 - 1


class BindingError(ValueError):
    """A binding input has the wrong type or size."""


@dataclass(frozen=True)
class BindingInputs:
    """The public values a provider binds into its attestation."""

    job_pub: bytes
    peer_pub: bytes
    gpu_evidence_hash: bytes = NO_GPU_EVIDENCE_HASH

    def __post_init__(self) -> None:
        _check_len("job_pub", self.job_pub, X25519_PUB_LEN)
        _check_len("peer_pub", self.peer_pub, ED25519_PUB_LEN)
        _check_len("gpu_evidence_hash", self.gpu_evidence_hash, GPU_EVIDENCE_HASH_LEN)


def _check_len(name: str, value: object, expected: int) -> None:
    if not isinstance(value, bytes):
        raise BindingError(f"{name} must be bytes, got {type(value).__name__}")
    if len(value) != expected:
        raise BindingError(f"{name} must be {expected} bytes, got {len(value)}")


def epoch_at(unix_time: float) -> int:
    """The binding epoch that contains ``unix_time`` (seconds since 1970)."""
    if unix_time < 0:
        raise BindingError(f"unix_time must be non-negative, got {unix_time}")
    return int(unix_time // EPOCH_SECONDS)


def accepted_epochs(unix_time: float) -> tuple[int, ...]:
    """Epochs a verifier accepts at ``unix_time``, current epoch first."""
    current = epoch_at(unix_time)
    around = range(current - ACCEPTED_EPOCH_LAG, current + ACCEPTED_EPOCH_LEAD + 1)
    return (current, *(e for e in around if e != current and e >= 0))


def gpu_evidence_hash(gpu_evidence: bytes | None) -> bytes:
    """SHA-256 of GPU evidence, or 32 zero bytes when there is none."""
    if gpu_evidence is None:
        return NO_GPU_EVIDENCE_HASH
    if not isinstance(gpu_evidence, bytes):
        raise BindingError(f"gpu_evidence must be bytes, got {type(gpu_evidence).__name__}")
    return hashlib.sha256(gpu_evidence).digest()


def _lp(field: bytes) -> bytes:
    return struct.pack(">I", len(field)) + field


def report_data_for(inputs: BindingInputs, epoch: int) -> bytes:
    """The 64-byte report_data a provider puts into its quote for ``epoch``."""
    if not isinstance(epoch, int) or not 0 <= epoch <= _MAX_EPOCH:
        raise BindingError(f"epoch must be a uint64, got {epoch!r}")
    digest = hashlib.sha512(BINDING_DOMAIN_TAG)
    for field in (
        inputs.job_pub,
        inputs.peer_pub,
        inputs.gpu_evidence_hash,
        struct.pack(">Q", epoch),
    ):
        digest.update(_lp(field))
    return digest.digest()


def matching_epoch(report_data: bytes, inputs: BindingInputs, epochs: Iterable[int]) -> int | None:
    """The epoch among ``epochs`` whose binding equals ``report_data``, else None."""
    _check_len("report_data", report_data, REPORT_DATA_LEN)
    for epoch in epochs:
        if hmac.compare_digest(report_data_for(inputs, epoch), report_data):
            return epoch
    return None
