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
from meshnode.pay.channel.ledger import (
    LEDGER_FILENAME,
    ChannelConflict,
    ChannelRecord,
    ChannelRef,
    JobUsage,
    Ledger,
    StaleVoucher,
    UnknownChannel,
)

SEED = bytes(range(32))
SIGNER = VoucherSigner(SEED)
CHANNEL = (1 << 100) + 7  # wider than sqlite's int64
REF = ChannelRef(CHANNEL, SIGNER.public_key)
OTHER_KEY = VoucherSigner(bytes(32)).public_key
NOW = 1_700_000_000.0
CHILD_READY_TIMEOUT_S = 30.0


def _channel(deposit: int = 5 * 10**9) -> ChannelRecord:
    return ChannelRecord(CHANNEL, SIGNER.public_key, deposit, NOW, address="0:" + "ab" * 32)


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
    assert ledger.channel(REF) == _channel()
    assert ledger.channel(ChannelRef(CHANNEL + 1, SIGNER.public_key)) is None


def test_the_same_id_under_another_key_is_another_channel(ledger: Ledger) -> None:
    squatter = ChannelRecord(CHANNEL, OTHER_KEY, 1, NOW, address="0:" + "cd" * 32)
    ledger.add_channel(squatter)
    assert ledger.channel(REF) == _channel()
    assert ledger.channel(squatter.ref) == squatter
    ledger.record_voucher(REF, SIGNER.sign(VoucherState(CHANNEL, 1, 10)), NOW)
    assert ledger.latest_voucher(squatter.ref) is None


def test_the_same_channel_at_another_address_is_refused(ledger: Ledger) -> None:
    moved = ChannelRecord(CHANNEL, SIGNER.public_key, 1, NOW, address="0:" + "ef" * 32)
    with pytest.raises(ChannelConflict):
        ledger.add_channel(moved)


def test_a_closed_channel_never_reopens(ledger: Ledger) -> None:
    ledger.set_state(REF, "closing")
    ledger.set_state(REF, "closed")
    ledger.set_state(REF, "open")
    record = ledger.channel(REF)
    assert record is not None and record.state == "closed" and not record.is_open


def test_latest_voucher_is_the_last_recorded(ledger: Ledger) -> None:
    ledger.record_voucher(REF, SIGNER.sign(VoucherState(CHANNEL, 1, 100)), NOW)
    second = SIGNER.sign(VoucherState(CHANNEL, 2, 250))
    ledger.record_voucher(REF, second, NOW + 1)
    stored = ledger.latest_voucher(REF)
    assert stored is not None
    assert (stored.voucher, stored.accepted_at) == (second, NOW + 1)


def test_older_voucher_cannot_replace_a_newer_one(ledger: Ledger) -> None:
    ledger.record_voucher(REF, SIGNER.sign(VoucherState(CHANNEL, 5, 500)), NOW)
    with pytest.raises(StaleVoucher):
        ledger.record_voucher(REF, SIGNER.sign(VoucherState(CHANNEL, 4, 900)), NOW)
    with pytest.raises(StaleVoucher):
        ledger.record_voucher(REF, SIGNER.sign(VoucherState(CHANNEL, 6, 499)), NOW)
    stored = ledger.latest_voucher(REF)
    assert stored is not None and stored.voucher.seqno == 5


def test_voucher_for_an_unknown_channel_is_refused(ledger: Ledger) -> None:
    with pytest.raises(UnknownChannel):
        ledger.record_voucher(ChannelRef(CHANNEL + 1, SIGNER.public_key),
                              SIGNER.sign(VoucherState(CHANNEL + 1, 1, 1)), NOW)


def test_usage_is_upserted_per_job_and_summed_per_channel(ledger: Ledger) -> None:
    ledger.record_usage(JobUsage("job-a", REF, 10, 5, 40, NOW, complete=False))
    ledger.record_usage(JobUsage("job-a", REF, 10, 9, 60, NOW + 1))
    ledger.record_usage(JobUsage("job-b", REF, 1, 1, 7, NOW + 2, complete=False))
    assert ledger.usage("job-a") == JobUsage("job-a", REF, 10, 9, 60, NOW + 1)
    assert ledger.channel_owed(REF) == 67
    assert [j.complete for j in ledger.jobs(REF)] == [True, False]


def test_usage_for_an_unknown_channel_is_refused(ledger: Ledger) -> None:
    with pytest.raises(UnknownChannel):
        ledger.record_usage(JobUsage("job", ChannelRef(CHANNEL + 1, OTHER_KEY), 1, 1, 1, NOW))


def test_reopening_sees_everything_recorded(tmp_path: Path) -> None:
    with Ledger(tmp_path) as first:
        first.add_channel(_channel())
        first.record_voucher(REF, SIGNER.sign(VoucherState(CHANNEL, 3, 33)), NOW)
    with Ledger(tmp_path) as second:
        stored = second.latest_voucher(REF)
        assert stored is not None and stored.voucher.sent == 33


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from meshnode.core.voucher import VoucherSigner, VoucherState
    from meshnode.pay.channel.ledger import ChannelRecord, Ledger

    data_dir, seed_hex = Path(sys.argv[1]), sys.argv[2]
    channel, sent = int(sys.argv[3]), int(sys.argv[4])
    signer = VoucherSigner(bytes.fromhex(seed_hex))
    ledger = Ledger(data_dir)
    ledger.add_channel(ChannelRecord(channel, signer.public_key, 10**12, 0.0))
    record = ChannelRecord(channel, signer.public_key, 10**12, 0.0)
    ledger.record_voucher(record.ref, signer.sign(VoucherState(channel, 1, sent)), 1.0)
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
        stored = reopened.latest_voucher(REF)
        assert stored is not None
        assert (stored.voucher.seqno, stored.voucher.sent) == (1, 4242)
        stored.voucher.verify(SIGNER.public_key)


def test_a_version_1_ledger_is_migrated_with_its_vouchers_and_usage(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / LEDGER_FILENAME)
    db.executescript(
        """
        CREATE TABLE channels (channel_id TEXT PRIMARY KEY, client_key BLOB NOT NULL,
            deposit TEXT NOT NULL, opened_at REAL NOT NULL);
        CREATE TABLE vouchers (channel_id TEXT PRIMARY KEY, seqno INTEGER NOT NULL,
            sent TEXT NOT NULL, boc BLOB NOT NULL, accepted_at REAL NOT NULL);
        CREATE TABLE usage (job_id TEXT PRIMARY KEY, channel_id TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
            cost TEXT NOT NULL, updated_at REAL NOT NULL);
        PRAGMA user_version=1;
        """
    )
    voucher = SIGNER.sign(VoucherState(CHANNEL, 2, 77))
    db.execute("INSERT INTO channels VALUES (?, ?, ?, ?)",
               (str(CHANNEL), SIGNER.public_key, "1000", NOW))
    db.execute("INSERT INTO vouchers VALUES (?, ?, ?, ?, ?)",
               (str(CHANNEL), 2, "77", voucher.to_boc(), NOW))
    db.execute("INSERT INTO usage VALUES ('j', ?, 3, 4, '77', ?)", (str(CHANNEL), NOW))
    db.commit()
    db.close()
    with Ledger(tmp_path) as migrated:
        assert migrated.channel(REF) == ChannelRecord(CHANNEL, SIGNER.public_key, 1000, NOW)
        stored = migrated.latest_voucher(REF)
        assert stored is not None and stored.voucher == voucher
        assert migrated.channel_owed(REF) == 77
