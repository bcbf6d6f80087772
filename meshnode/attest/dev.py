"""`dev` evidence: no TEE, only a statement signed by the peer key. INSECURE.

It proves nothing about where the provider runs; it exists so a mesh can be developed
and tested on machines without TDX. Clients refuse it unless told to allow insecure
providers, and every verdict that accepts it carries insecure=True.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from meshnode.attest.evidence import KIND_DEV, Evidence, EvidenceError
from meshnode.core.attest_binding import ED25519_PUB_LEN, REPORT_DATA_LEN

# Domain separation: a dev signature can never be replayed as an advert signature.
DEV_STATEMENT_TAG = b"meshnode/attest/dev-statement/v1"
DEV_STATEMENT_VERSION = 1
# Shown to anyone who decodes the blob by hand.
INSECURE_NOTICE = "INSECURE dev evidence: no TEE, the operator can read all prompts"
# Ed25519 signature size.
_SIG_LEN = 64


@dataclass(frozen=True)
class DevStatement:
    report_data: bytes
    peer_pub: bytes
    signature: bytes

    def signature_valid(self) -> bool:
        try:
            VerifyKey(self.peer_pub).verify(DEV_STATEMENT_TAG + self.report_data, self.signature)
        except (BadSignatureError, ValueError):
            return False
        return True


class DevEvidenceProducer:
    """Signs report_data with the peer's Ed25519 key. No TEE is involved."""

    kind = KIND_DEV

    def __init__(self, peer_key: SigningKey) -> None:
        self._key = peer_key

    def produce(self, report_data: bytes) -> Evidence:
        if len(report_data) != REPORT_DATA_LEN:
            raise ValueError(f"report_data must be {REPORT_DATA_LEN} bytes")
        sig = self._key.sign(DEV_STATEMENT_TAG + report_data).signature
        blob = msgpack.packb(
            {
                "v": DEV_STATEMENT_VERSION,
                "notice": INSECURE_NOTICE,
                "report_data": report_data,
                "peer_pub": bytes(self._key.verify_key),
                "sig": sig,
            },
            use_bin_type=True,
        )
        return Evidence(kind=KIND_DEV, blob=blob)


def parse_dev_statement(blob: bytes) -> DevStatement:
    try:
        d = msgpack.unpackb(blob, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise EvidenceError(f"dev evidence is not msgpack: {exc}") from exc
    if not isinstance(d, dict) or d.get("v") != DEV_STATEMENT_VERSION:
        raise EvidenceError("dev evidence has an unknown format")
    rd, pub, sig = d.get("report_data"), d.get("peer_pub"), d.get("sig")
    if not (isinstance(rd, bytes) and len(rd) == REPORT_DATA_LEN):
        raise EvidenceError("dev evidence report_data must be 64 bytes")
    if not (isinstance(pub, bytes) and len(pub) == ED25519_PUB_LEN):
        raise EvidenceError("dev evidence peer_pub must be 32 bytes")
    if not (isinstance(sig, bytes) and len(sig) == _SIG_LEN):
        raise EvidenceError("dev evidence signature must be 64 bytes")
    return DevStatement(report_data=rd, peer_pub=pub, signature=sig)
