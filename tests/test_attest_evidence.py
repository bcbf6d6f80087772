"""Evidence encoding and the producers: configfs-tsm (against a directory laid out like
configfs) and dev (self-signed, insecure)."""

from pathlib import Path

import msgpack
import pytest
from attest_synth import SYNTH_MRTD, synth_platform
from nacl.signing import SigningKey

from meshnode.attest.dev import INSECURE_NOTICE, DevEvidenceProducer, parse_dev_statement
from meshnode.attest.evidence import (
    MAX_EVIDENCE_BLOB_BYTES,
    Evidence,
    EvidenceError,
    EvidenceUnavailableError,
)
from meshnode.attest.local import describe_local_evidence, make_evidence
from meshnode.attest.tdx_tsm import QuoteGenerationError, TdxEvidenceProducer
from meshnode.core.attest_binding import (
    BindingInputs,
    epoch_at,
    gpu_evidence_hash,
    report_data_for,
)

NOW = 1_750_000_000.0
RD = bytes(range(64))


def test_evidence_round_trips_through_msgpack() -> None:
    ev = Evidence(kind="tdx", blob=b"quote", gpu_evidence=b"gpu")
    wire = msgpack.packb(ev.to_dict(), use_bin_type=True)
    assert Evidence.from_dict(msgpack.unpackb(wire, raw=False)) == ev


def test_oversized_blob_is_refused() -> None:
    with pytest.raises(EvidenceError, match="limit"):
        Evidence(kind="tdx", blob=bytes(MAX_EVIDENCE_BLOB_BYTES + 1))


@pytest.mark.parametrize(
    "d",
    [
        {"v": 1, "kind": "sev", "blob": b"x"},
        {"v": 2, "kind": "tdx", "blob": b"x"},
        {"v": 1, "kind": "tdx", "blob": "text"},
        {"v": 1, "kind": "tdx", "blob": b"x", "extra": 1},
        ["not", "a", "map"],
    ],
    ids=["kind", "version", "blob type", "unknown field", "not a map"],
)
def test_malformed_evidence_maps_are_typed_errors(d: object) -> None:
    with pytest.raises(EvidenceError):
        Evidence.from_dict(d)


def test_digest_differs_when_gpu_evidence_differs() -> None:
    assert Evidence("tdx", b"q", b"a").digest() != Evidence("tdx", b"q", b"b").digest()


# ------------------------------------------------------------------- configfs-tsm


def _fake_configfs(root: Path, quote: bytes, provider: str = "tdx_guest") -> Path:
    """What the kernel shows under a report entry (the test plays the kernel's part)."""
    entry = root / "meshnode-test"
    entry.mkdir(parents=True)
    (entry / "outblob").write_bytes(quote)
    (entry / "generation").write_text("1\n")
    (entry / "provider").write_text(provider + "\n")
    return entry


def test_tsm_producer_outside_a_td_names_the_missing_directory(tmp_path: Path) -> None:
    root = tmp_path / "tsm" / "report"
    with pytest.raises(EvidenceUnavailableError, match=str(root)) as err:
        TdxEvidenceProducer(root).produce(RD)
    assert "TDX guest" in str(err.value)


def test_tsm_producer_writes_inblob_and_returns_outblob(tmp_path: Path) -> None:
    quote = synth_platform().quote(RD)
    entry = _fake_configfs(tmp_path, quote)
    ev = TdxEvidenceProducer(tmp_path, entry_name=entry.name).produce(RD)
    assert (entry / "inblob").read_bytes() == RD
    assert ev.kind == "tdx" and ev.blob == quote


def test_tsm_producer_creates_its_entry(tmp_path: Path) -> None:
    producer = TdxEvidenceProducer(tmp_path, entry_name="fresh")
    with pytest.raises(QuoteGenerationError):  # a plain directory has no kernel behind it
        producer.produce(RD)
    assert (tmp_path / "fresh" / "inblob").read_bytes() == RD


def test_tsm_producer_refuses_a_non_tdx_provider(tmp_path: Path) -> None:
    entry = _fake_configfs(tmp_path, b"x", provider="sev_guest")
    with pytest.raises(EvidenceUnavailableError, match="sev_guest"):
        TdxEvidenceProducer(tmp_path, entry_name=entry.name).produce(RD)


def test_tsm_producer_refuses_an_outblob_that_is_not_a_tdx_quote(tmp_path: Path) -> None:
    entry = _fake_configfs(tmp_path, bytes(1000))
    with pytest.raises(QuoteGenerationError, match="not a TDX quote"):
        TdxEvidenceProducer(tmp_path, entry_name=entry.name).produce(RD)


def test_tsm_producer_rejects_wrong_report_data_size(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="64 bytes"):
        TdxEvidenceProducer(tmp_path).produce(bytes(32))


def test_describe_local_evidence_outside_a_td_offers_only_dev(tmp_path: Path) -> None:
    report = describe_local_evidence(bytes(32), bytes(32), NOW, tsm_root=tmp_path / "none")
    assert not report.available and report.kind == "dev" and "INSECURE" in report.detail
    assert report.policy_snippet() is None


def test_describe_local_evidence_reads_measurements_of_the_local_quote(tmp_path: Path) -> None:
    job, peer = bytes([1]) * 32, bytes([2]) * 32
    expected_rd = report_data_for(BindingInputs(job, peer), epoch_at(NOW))
    entry = _fake_configfs(tmp_path, synth_platform().quote(expected_rd))
    report = describe_local_evidence(job, peer, NOW, tsm_root=tmp_path, entry_name=entry.name)
    assert report.available and report.kind == "tdx"
    assert (entry / "inblob").read_bytes() == expected_rd == report.report_data
    assert report.measurements["mrtd"] == SYNTH_MRTD.hex()
    snippet = report.policy_snippet()
    assert snippet is not None and f'mrtd = "{SYNTH_MRTD.hex()}"' in snippet


# ---------------------------------------------------------------------------- dev


def test_dev_evidence_is_a_signed_statement_marked_insecure() -> None:
    key = SigningKey.generate()
    ev = DevEvidenceProducer(key).produce(RD)
    st = parse_dev_statement(ev.blob)
    assert ev.kind == "dev" and st.report_data == RD and st.peer_pub == bytes(key.verify_key)
    assert st.signature_valid()
    assert INSECURE_NOTICE.encode() in ev.blob


def test_dev_statement_with_a_changed_report_data_fails_its_signature() -> None:
    st = parse_dev_statement(DevEvidenceProducer(SigningKey.generate()).produce(RD).blob)
    forged = type(st)(report_data=bytes(64), peer_pub=st.peer_pub, signature=st.signature)
    assert not forged.signature_valid()


def test_garbage_dev_blob_is_an_evidence_error() -> None:
    with pytest.raises(EvidenceError):
        parse_dev_statement(b"\xc1 not msgpack")


async def test_make_evidence_binds_keys_epoch_and_gpu_evidence() -> None:
    key = SigningKey.generate()
    job, peer = bytes([7]) * 32, bytes(key.verify_key)
    ev = await make_evidence(DevEvidenceProducer(key), job, peer, NOW, gpu_evidence=b"nv report")
    expected = report_data_for(
        BindingInputs(job, peer, gpu_evidence_hash(b"nv report")), epoch_at(NOW)
    )
    assert parse_dev_statement(ev.blob).report_data == expected
    assert ev.gpu_evidence == b"nv report"
