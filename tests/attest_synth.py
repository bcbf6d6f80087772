"""Synthetic Intel DCAP material for tests: a private root CA, a PCK chain, signed
collateral and TDX v4 quotes, all shaped like the real ones so that dcap-qvl's
`verify_with_root_ca` / `QuoteVerifier(root_ca_der)` verifies them end to end.

Layout of a TDX v4 quote (Intel TDX DCAP Quote Generation Library spec):
  header (48) ‖ TD report body (584) ‖ u32 auth size ‖ ECDSA sig (64) ‖ attestation
  key (64) ‖ cert data type 6 { QE report (384) ‖ QE report sig (64) ‖ u16 auth len ‖
  auth data ‖ cert data type 5 { PEM PCK chain } }
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
TEE_TYPE_TDX = 0x81
# SEPT_VE_DISABLE (bit 28) is required by dcap-qvl; debug (bit 0) is off.
GOOD_TD_ATTRIBUTES = (1 << 28).to_bytes(8, "little")
DEBUG_TD_ATTRIBUTES = ((1 << 28) | 1).to_bytes(8, "little")
SYNTH_MRTD = bytes([0x11]) * 48
SYNTH_RTMRS = (bytes([0x20]) * 48, bytes([0x21]) * 48, bytes([0x22]) * 48, bytes(48))
SYNTH_FMSPC = bytes.fromhex("00A06F000000")
_CPU_SVN = bytes([3, 3, 2, 2, 4, 1, 0, 5] + [0] * 8)
_PCE_SVN = 11
# tee_tcb_svn[0] = module minor SVN, [1] = module major version (TDX_01 identity).
_TEE_TCB_SVN = bytes([6, 1, 3] + [0] * 13)
_QE_MR_SIGNER = bytes([0xDC]) * 32
_QE_ISV_PROD_ID = 2
_QE_ISV_SVN = 4
_SGX_EXT = "1.2.840.113741.1.13.1"


# ------------------------------------------------------------------ tiny DER encoder


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def _oid(dotted: str) -> bytes:
    parts = [int(p) for p in dotted.split(".")]
    body = bytes([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, body)


def _int(v: int) -> bytes:
    raw = v.to_bytes(max(1, (v.bit_length() + 8) // 8), "big")
    return _tlv(0x02, raw)


def _seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def _entry(suffix: str, value: bytes) -> bytes:
    return _seq(_oid(f"{_SGX_EXT}.{suffix}"), value)


def _sgx_extension(fmspc: bytes, dynamic_platform: bool, cached_keys: bool, smt: bool) -> bytes:
    tcb = [_entry(f"2.{i + 1}", _int(svn)) for i, svn in enumerate(_CPU_SVN)]
    tcb.append(_entry("2.17", _int(_PCE_SVN)))
    tcb.append(_entry("2.18", _tlv(0x04, _CPU_SVN)))
    config = _seq(
        _entry("7.1", _tlv(0x01, b"\xff" if dynamic_platform else b"\x00")),
        _entry("7.2", _tlv(0x01, b"\xff" if cached_keys else b"\x00")),
        _entry("7.3", _tlv(0x01, b"\xff" if smt else b"\x00")),
    )
    return _seq(
        _entry("1", _tlv(0x04, bytes(range(16)))),  # PPID
        _entry("2", _seq(*tcb)),
        _entry("3", _tlv(0x04, b"\x00\x00")),  # PCE-ID
        _entry("4", _tlv(0x04, fmspc)),
        _entry("5", _tlv(0x0A, b"\x01")),  # SGX type: Scalable (platform CA)
        _entry("6", _tlv(0x04, bytes(range(16, 32)))),  # platform instance id
        _entry("7", config),
    )


# ------------------------------------------------------------------------- the PKI


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshnode test PKI"),
        ]
    )


def _raw_sig(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    not_before: datetime,
    extra: x509.ExtensionType | None = None,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=not ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if extra is not None:
        b = b.add_extension(extra, critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _crl(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, issued: datetime) -> bytes:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(issued - timedelta(days=1))
        .next_update(issued + timedelta(days=30))
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.DER)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@dataclass
class SynthPlatform:
    """A private DCAP trust chain plus one TDX platform certified by it."""

    issued: datetime
    fmspc: bytes = SYNTH_FMSPC
    dynamic_platform: bool = True
    cached_keys: bool = True
    smt: bool = True
    root_key: ec.EllipticCurvePrivateKey = field(default_factory=_new_key)
    platform_ca_key: ec.EllipticCurvePrivateKey = field(default_factory=_new_key)
    pck_key: ec.EllipticCurvePrivateKey = field(default_factory=_new_key)
    tcb_signing_key: ec.EllipticCurvePrivateKey = field(default_factory=_new_key)
    attestation_key: ec.EllipticCurvePrivateKey = field(default_factory=_new_key)

    def __post_init__(self) -> None:
        nb = self.issued - timedelta(days=30)
        self.root = _cert(
            "Synth SGX Root CA", self.root_key, None, self.root_key, ca=True, not_before=nb
        )
        self.platform_ca = _cert(
            "Synth SGX PCK Platform CA",
            self.platform_ca_key,
            self.root,
            self.root_key,
            ca=True,
            not_before=nb,
        )
        ext = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(_SGX_EXT),
            _sgx_extension(self.fmspc, self.dynamic_platform, self.cached_keys, self.smt),
        )
        self.pck = _cert(
            "Synth SGX PCK Certificate",
            self.pck_key,
            self.platform_ca,
            self.platform_ca_key,
            ca=False,
            not_before=nb,
            extra=ext,
        )
        self.tcb_signing = _cert(
            "Synth SGX TCB Signing",
            self.tcb_signing_key,
            self.root,
            self.root_key,
            ca=False,
            not_before=nb,
        )

    @property
    def root_ca_der(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.DER)

    @property
    def verify_time(self) -> int:
        """A unix time inside the collateral window (issue date + 1 hour)."""
        return int((self.issued + timedelta(hours=1)).timestamp())

    # ------------------------------------------------------------------ collateral

    def collateral_json(
        self, tcb_status: str = "UpToDate", advisories: tuple[str, ...] = ()
    ) -> str:
        issue = self.issued.strftime("%Y-%m-%dT%H:%M:%SZ")
        next_update = (self.issued + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
        level_date = (self.issued - timedelta(days=60)).strftime("%Y-%m-%dT%H:%M:%SZ")

        def comps(svns: bytes) -> list[dict[str, int]]:
            return [{"svn": v} for v in svns]

        tcb_info = {
            "id": "TDX",
            "version": 3,
            "issueDate": issue,
            "nextUpdate": next_update,
            "fmspc": self.fmspc.hex().upper(),
            "pceId": "0000",
            "tcbType": 0,
            "tcbEvaluationDataNumber": 17,
            "tdxModule": {
                "mrsigner": "00" * 48,
                "attributes": "0000000000000000",
                "attributesMask": "FFFFFFFFFFFFFFFF",
            },
            "tdxModuleIdentities": [
                {
                    "id": "TDX_01",
                    "mrsigner": "00" * 48,
                    "attributes": "0000000000000000",
                    "attributesMask": "FFFFFFFFFFFFFFFF",
                    "tcbLevels": [
                        {
                            "tcb": {"isvsvn": _TEE_TCB_SVN[0]},
                            "tcbDate": level_date,
                            "tcbStatus": "UpToDate",
                        }
                    ],
                }
            ],
            "tcbLevels": [
                {
                    "tcb": {
                        "sgxtcbcomponents": comps(_CPU_SVN),
                        "pcesvn": _PCE_SVN,
                        "tdxtcbcomponents": comps(_TEE_TCB_SVN),
                    },
                    "tcbDate": level_date,
                    "tcbStatus": tcb_status,
                    **({"advisoryIDs": list(advisories)} if advisories else {}),
                }
            ],
        }
        qe_identity = {
            "id": "TD_QE",
            "version": 2,
            "issueDate": issue,
            "nextUpdate": next_update,
            "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": _QE_MR_SIGNER.hex().upper(),
            "isvprodid": _QE_ISV_PROD_ID,
            "tcbLevels": [
                {"tcb": {"isvsvn": _QE_ISV_SVN}, "tcbDate": level_date, "tcbStatus": "UpToDate"}
            ],
        }
        tcb_text = json.dumps(tcb_info, separators=(",", ":"))
        qe_text = json.dumps(qe_identity, separators=(",", ":"))
        chain = _pem(self.tcb_signing) + _pem(self.root)
        return json.dumps(
            {
                "pck_crl_issuer_chain": _pem(self.platform_ca) + _pem(self.root),
                "root_ca_crl": _crl(self.root, self.root_key, self.issued).hex(),
                "pck_crl": _crl(self.platform_ca, self.platform_ca_key, self.issued).hex(),
                "tcb_info_issuer_chain": chain,
                "tcb_info": tcb_text,
                "tcb_info_signature": _raw_sig(self.tcb_signing_key, tcb_text.encode()).hex(),
                "qe_identity_issuer_chain": chain,
                "qe_identity": qe_text,
                "qe_identity_signature": _raw_sig(self.tcb_signing_key, qe_text.encode()).hex(),
            }
        )

    # ------------------------------------------------------------------------ quote

    def quote(
        self,
        report_data: bytes,
        *,
        mrtd: bytes = SYNTH_MRTD,
        rtmrs: tuple[bytes, bytes, bytes, bytes] = SYNTH_RTMRS,
        td_attributes: bytes = GOOD_TD_ATTRIBUTES,
    ) -> bytes:
        assert len(report_data) == 64 and len(mrtd) == 48 and all(len(r) == 48 for r in rtmrs)
        header = struct.pack("<HHIHH", 4, 2, TEE_TYPE_TDX, 0, 0) + INTEL_QE_VENDOR_ID + bytes(20)
        body = (
            _TEE_TCB_SVN
            + bytes([0x5B]) * 48  # mr_seam
            + bytes(48)  # mr_signer_seam (Intel TDX module: zeros)
            + bytes(8)  # seam_attributes
            + td_attributes
            + bytes.fromhex("e702060000000000")  # xfam
            + mrtd
            + bytes(48) * 3  # mr_config_id, mr_owner, mr_owner_config
            + b"".join(rtmrs)
            + report_data
        )
        assert len(header) == 48 and len(body) == 584
        signed = header + body
        att_pub = self.attestation_key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )[1:]
        qe_auth = bytes(range(32))
        qe_report = (
            _CPU_SVN
            + struct.pack("<I", 0)  # misc_select
            + bytes(28)
            + bytes.fromhex("11000000000000000000000000000000")  # attributes (no debug)
            + bytes([0xE5]) * 32  # mr_enclave
            + bytes(32)
            + _QE_MR_SIGNER
            + bytes(96)
            + struct.pack("<HH", _QE_ISV_PROD_ID, _QE_ISV_SVN)
            + bytes(60)
            + hashlib.sha256(att_pub + qe_auth).digest()
            + bytes(32)
        )
        assert len(qe_report) == 384
        pem_chain = (_pem(self.pck) + _pem(self.platform_ca) + _pem(self.root)).encode()
        inner = struct.pack("<HI", 5, len(pem_chain)) + pem_chain
        qe_cert_data = (
            qe_report
            + _raw_sig(self.pck_key, qe_report)
            + struct.pack("<H", len(qe_auth))
            + qe_auth
            + inner
        )
        auth = (
            _raw_sig(self.attestation_key, signed)
            + att_pub
            + struct.pack("<HI", 6, len(qe_cert_data))
            + qe_cert_data
        )
        return signed + struct.pack("<I", len(auth)) + auth


def synth_platform(
    dynamic_platform: bool = True, cached_keys: bool = True, smt: bool = True
) -> SynthPlatform:
    """A fresh platform whose collateral was issued at a fixed, recent-looking date."""
    return SynthPlatform(
        issued=datetime(2025, 6, 1, 12, 0, tzinfo=UTC),
        dynamic_platform=dynamic_platform,
        cached_keys=cached_keys,
        smt=smt,
    )
