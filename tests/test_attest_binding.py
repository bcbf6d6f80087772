"""report_data binding: SHA-512(tag ‖ lp(job pub) ‖ lp(peer pub) ‖ lp(gpu hash) ‖ lp(epoch))."""

import hashlib
import struct

import pytest

from meshnode.core.attest_binding import (
    BINDING_DOMAIN_TAG,
    EPOCH_SECONDS,
    NO_GPU_EVIDENCE_HASH,
    REPORT_DATA_LEN,
    BindingError,
    BindingInputs,
    accepted_epochs,
    epoch_at,
    gpu_evidence_hash,
    matching_epoch,
    report_data_for,
)

JOB = bytes(range(32))
PEER = bytes(range(32, 64))
INPUTS = BindingInputs(JOB, PEER)
NOW = 1_750_000_000.0


def _lp(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


def test_report_data_is_sha512_over_tagged_length_prefixed_fields() -> None:
    epoch = 486_111
    expected = hashlib.sha512(
        BINDING_DOMAIN_TAG
        + _lp(JOB)
        + _lp(PEER)
        + _lp(NO_GPU_EVIDENCE_HASH)
        + _lp(struct.pack(">Q", epoch))
    ).digest()
    assert report_data_for(INPUTS, epoch) == expected
    assert len(expected) == REPORT_DATA_LEN


@pytest.mark.parametrize(
    "other",
    [
        BindingInputs(bytes(32), PEER),
        BindingInputs(JOB, bytes(32)),
        BindingInputs(JOB, PEER, gpu_evidence_hash(b"gpu report")),
    ],
    ids=["job key", "peer key", "gpu evidence"],
)
def test_every_input_changes_report_data(other: BindingInputs) -> None:
    assert report_data_for(other, 7) != report_data_for(INPUTS, 7)


def test_epoch_changes_report_data() -> None:
    assert report_data_for(INPUTS, 7) != report_data_for(INPUTS, 8)


def test_epoch_is_floor_of_time_over_epoch_seconds() -> None:
    assert epoch_at(EPOCH_SECONDS * 5) == 5
    assert epoch_at(EPOCH_SECONDS * 5 - 0.001) == 4


def test_previous_and_next_epochs_are_accepted_but_not_older_ones() -> None:
    epoch = epoch_at(NOW)
    for ok in (epoch - 1, epoch, epoch + 1):
        assert matching_epoch(report_data_for(INPUTS, ok), INPUTS, accepted_epochs(NOW)) == ok
    stale = report_data_for(INPUTS, epoch - 2)
    assert matching_epoch(stale, INPUTS, accepted_epochs(NOW)) is None


def test_no_gpu_evidence_hashes_to_zeros_and_evidence_to_sha256() -> None:
    assert gpu_evidence_hash(None) == bytes(32)
    assert gpu_evidence_hash(b"x") == hashlib.sha256(b"x").digest()


@pytest.mark.parametrize(
    ("job", "peer", "gpu"),
    [(bytes(31), PEER, bytes(32)), (JOB, bytes(33), bytes(32)), (JOB, PEER, bytes(16))],
)
def test_wrong_key_sizes_are_a_binding_error(job: bytes, peer: bytes, gpu: bytes) -> None:
    with pytest.raises(BindingError, match="must be"):
        BindingInputs(job, peer, gpu)


def test_epoch_must_fit_uint64() -> None:
    with pytest.raises(BindingError, match="uint64"):
        report_data_for(INPUTS, 2**64)


def test_report_data_of_wrong_size_is_a_binding_error() -> None:
    with pytest.raises(BindingError, match="64 bytes"):
        matching_epoch(bytes(32), INPUTS, [1])
