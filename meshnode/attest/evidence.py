"""Attestation evidence as carried in adverts, and the interface that produces it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from meshnode.core.errors import MeshnodeError
from meshnode.core.text import shown, shown_keys

# A TDX v4 quote with its embedded PEM PCK chain is about 5 KB; 16 KiB leaves room
# for v5 quotes and longer chains while keeping adverts small.
MAX_EVIDENCE_BLOB_BYTES = 16 * 1024
# NVIDIA CC GPU evidence (attestation report + device cert chain) is a few KB per GPU;
# 64 KiB covers an 8-GPU host.
MAX_GPU_EVIDENCE_BYTES = 64 * 1024
# Known evidence kinds; anything else is refused before parsing.
KIND_TDX = "tdx"
KIND_DEV = "dev"
EVIDENCE_KINDS = frozenset({KIND_TDX, KIND_DEV})
# Version of the dict encoding below.
EVIDENCE_FORMAT_VERSION = 1


class EvidenceError(ValueError):
    """Evidence is malformed, oversized or of an unknown kind."""


class EvidenceUnavailableError(MeshnodeError, RuntimeError):
    """This machine cannot produce the requested kind of evidence."""

    label = "no TEE evidence"


@dataclass(frozen=True)
class Evidence:
    """What a provider attaches to its advert so clients can check where it runs."""

    kind: str
    blob: bytes
    gpu_evidence: bytes | None = None

    def __post_init__(self) -> None:
        if self.kind not in EVIDENCE_KINDS:
            raise EvidenceError(f"unknown evidence kind {shown(self.kind)}")
        if not isinstance(self.blob, bytes) or not self.blob:
            raise EvidenceError("evidence blob must be non-empty bytes")
        if len(self.blob) > MAX_EVIDENCE_BLOB_BYTES:
            raise EvidenceError(
                f"evidence blob is {len(self.blob)} bytes (limit {MAX_EVIDENCE_BLOB_BYTES})"
            )
        if self.gpu_evidence is not None:
            if not isinstance(self.gpu_evidence, bytes):
                raise EvidenceError("gpu_evidence must be bytes")
            if len(self.gpu_evidence) > MAX_GPU_EVIDENCE_BYTES:
                raise EvidenceError(
                    f"GPU evidence is {len(self.gpu_evidence)} bytes "
                    f"(limit {MAX_GPU_EVIDENCE_BYTES})"
                )

    def to_dict(self) -> dict[str, Any]:
        """msgpack-able map for the advert's `attestation` field."""
        d: dict[str, Any] = {"v": EVIDENCE_FORMAT_VERSION, "kind": self.kind, "blob": self.blob}
        if self.gpu_evidence is not None:
            d["gpu"] = self.gpu_evidence
        return d

    @classmethod
    def from_dict(cls, d: object) -> Evidence:
        if not isinstance(d, dict):
            raise EvidenceError(f"evidence must be a map, got {type(d).__name__}")
        if d.get("v") != EVIDENCE_FORMAT_VERSION:
            raise EvidenceError(f"unsupported evidence format version {shown(d.get('v'))}")
        unknown = set(d) - {"v", "kind", "blob", "gpu"}
        if unknown:
            raise EvidenceError(f"unknown evidence fields {shown_keys(list(unknown))}")
        kind, blob, gpu = d.get("kind"), d.get("blob"), d.get("gpu")
        if not isinstance(kind, str):
            raise EvidenceError("evidence kind must be a string")
        if not isinstance(blob, bytes):
            raise EvidenceError("evidence blob must be bytes")
        if gpu is not None and not isinstance(gpu, bytes):
            raise EvidenceError("GPU evidence must be bytes")
        return cls(kind=kind, blob=blob, gpu_evidence=gpu)

    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding; the key of verification caches."""
        packed: bytes = msgpack.packb(self.to_dict(), use_bin_type=True)
        return hashlib.sha256(packed).digest()


class EvidenceProducer(Protocol):
    """Makes evidence that commits to a 64-byte report_data (see core.attest_binding)."""

    @property
    def kind(self) -> str: ...

    def produce(self, report_data: bytes) -> Evidence:
        """Blocking; call through trio.to_thread (see meshnode.attest.produce)."""
        ...
