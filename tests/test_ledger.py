"""The ledger keeps channels, the best voucher per channel and job usage across crashes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshnode.core.voucher import VoucherSigner, VoucherState
from meshnode.pay.ledger import (
    LEDGER_FILENAME,
    ChannelConflict,
    ChannelRecord,
    JobUsage,
    Ledger,
    StaleVoucher,
    UnknownChannel,
)

SEED = bytes(range(32))
SIGNER = VoucherSigner(SEED)
CHANNEL = (1 << 100) + 7  # wider than sqlite's int64
NOW = 1_700_000_000.0
CHILD_READY_TIMEOUT_S = 30.0


def _channel(deposit: int = 5 * 10**9) -> ChannelRecord:
    return ChannelRecord(CHANNEL, SIGNER.public_key, deposit, NOW)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    led = Ledger(tmp_path)
    led.add_channel(_channel())
    return led


def test_database_is_in_wal_mode(ledger: Ledger) -> None:
    db = sqlite3.connect(ledger.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_database_file_is_private(ledger: Ledger) -> None:
    assert (ledger.path.stat().st_mode & 0o777) == 0o600


def test_channel_round_trips_with_a_wide_id(ledger: Ledger) -> None:
    assert ledger.channel(CHANNEL) == _channel()
    assert ledger.channel(CHANNEL + 1) is None


def test_same_channel_id_with_another_key_is_refused(ledger: Ledger) -> None:
    other = ChannelRecord(CHANNEL, VoucherSigner(bytes(32)).public_key, 1, NOW)
    with pytest.raises(ChannelConflict):
        ledger.add_channel(other)


def test_latest_voucher_is_the_last_recorded(ledger: Ledger) -> None:
    ledger.record_voucher(SIGNER.sign(VoucherState(CHANNEL, 1, 100)), NOW)
    second = SIGNER.sign(VoucherState(CHANNEL, 2, 250))
    ledger.record_voucher(second, NOW + 1)
    stored = ledger.latest_voucher(CHANNEL)
    assert stored is not None
    assert (stored.voucher, stored.accepted_at) == (second, NOW + 1)


def test_older_voucher_cannot_replace_a_newer_one(ledger: Ledger) -> None:
    ledger.record_voucher(SIGNER.sign(VoucherState(CHANNEL, 5, 500)), NOW)
    with pytest.raises(StaleVoucher):
        ledger.record_voucher(SIGNER.sign(VoucherState(CHANNEL, 4, 900)), NOW)
    with pytest.raises(StaleVoucher):
        ledger.record_voucher(SIGNER.sign(VoucherState(CHANNEL, 6, 499)), NOW)
    stored = ledger.latest_voucher(CHANNEL)
    assert stored is not None and stored.voucher.seqno == 5


def test_voucher_for_an_unknown_channel_is_refused(ledger: Ledger) -> None:
    with pytest.raises(UnknownChannel):
        ledger.record_voucher(SIGNER.sign(VoucherState(CHANNEL + 1, 1, 1)), NOW)


def test_usage_is_upserted_per_job_and_summed_per_channel(ledger: Ledger) -> None:
    ledger.record_usage(JobUsage("job-a", CHANNEL, 10, 5, 40, NOW))
    ledger.record_usage(JobUsage("job-a", CHANNEL, 10, 9, 60, NOW + 1))
    ledger.record_usage(JobUsage("job-b", CHANNEL, 1, 1, 7, NOW + 2))
    assert ledger.usage("job-a") == JobUsage("job-a", CHANNEL, 10, 9, 60, NOW + 1)
    assert ledger.channel_owed(CHANNEL) == 67


def test_usage_for_an_unknown_channel_is_refused(ledger: Ledger) -> None:
    with pytest.raises(UnknownChannel):
        ledger.record_usage(JobUsage("job", CHANNEL + 1, 1, 1, 1, NOW))


def test_reopening_sees_everything_recorded(tmp_path: Path) -> None:
    with Ledger(tmp_path) as first:
        first.add_channel(_channel())
        first.record_voucher(SIGNER.sign(VoucherState(CHANNEL, 3, 33)), NOW)
    with Ledger(tmp_path) as second:
        stored = second.latest_voucher(CHANNEL)
        assert stored is not None and stored.voucher.sent == 33


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from meshnode.core.voucher import VoucherSigner, VoucherState
    from meshnode.pay.ledger import ChannelRecord, Ledger

    data_dir, seed_hex = Path(sys.argv[1]), sys.argv[2]
    channel, sent = int(sys.argv[3]), int(sys.argv[4])
    signer = VoucherSigner(bytes.fromhex(seed_hex))
    ledger = Ledger(data_dir)
    ledger.add_channel(ChannelRecord(channel, signer.public_key, 10**12, 0.0))
    ledger.record_voucher(signer.sign(VoucherState(channel, 1, sent)), 1.0)
    print("recorded", flush=True)
    time.sleep(3600)  # killed here, never closing the database
    """
)


def test_recorded_voucher_survives_sigkill(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path), SEED.hex(), str(CHANNEL), "4242"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # the child prints only after the commit returned
        assert line.strip() == "recorded"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=CHILD_READY_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL
    assert (tmp_path / (LEDGER_FILENAME + "-wal")).exists()  # nothing checkpointed it
    with Ledger(tmp_path) as reopened:
        stored = reopened.latest_voucher(CHANNEL)
        assert stored is not None
        assert (stored.voucher.seqno, stored.voucher.sent) == (1, 4242)
        stored.voucher.verify(SIGNER.public_key)
