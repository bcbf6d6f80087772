"""Durable record of channels, the latest accepted voucher per channel, and job usage.

sqlite in WAL mode with ``synchronous=FULL``: a commit returns only after the WAL is
fsynced, so ``record_voucher`` is durable when it returns. That matters because the
provider calls it before producing the tokens the voucher paid for; after a crash it can
still close the channel with the best voucher it was given.

The API is synchronous and thread-safe (one connection behind a lock): the trio shell
calls it through ``trio.to_thread.run_sync``. Amounts and channel ids are stored as
decimal text because uint128 channel ids and Coins amounts overflow sqlite's int64.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from meshnode.core.voucher import Voucher, parse_voucher

LEDGER_FILENAME = "ledger.sqlite3"

BUSY_TIMEOUT_S = 10.0
"""How long a write waits for another connection's lock before failing loudly."""

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    channel_id TEXT PRIMARY KEY,
    client_key BLOB NOT NULL,
    deposit TEXT NOT NULL,
    opened_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS vouchers (
    channel_id TEXT PRIMARY KEY REFERENCES channels(channel_id),
    seqno INTEGER NOT NULL,
    sent TEXT NOT NULL,
    boc BLOB NOT NULL,
    accepted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    job_id TEXT PRIMARY KEY,
    channel_id TEXT NOT NULL REFERENCES channels(channel_id),
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""


class LedgerError(Exception):
    """Base class for ledger failures the caller should surface."""


class UnknownChannel(LedgerError):
    """A voucher or usage row for a channel that was never added."""


class ChannelConflict(LedgerError):
    """The channel id is already recorded with a different client key."""


class StaleVoucher(LedgerError):
    """A voucher that does not advance the stored one (lower or equal seqno, lower sent)."""


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    channel_id: int
    client_key: bytes
    deposit: int
    opened_at: float


@dataclass(frozen=True, slots=True)
class StoredVoucher:
    voucher: Voucher
    accepted_at: float


@dataclass(frozen=True, slots=True)
class JobUsage:
    job_id: str
    channel_id: int
    prompt_tokens: int
    completion_tokens: int
    cost: int
    updated_at: float


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Ledger:
    """One sqlite database in a data dir; see the module docstring for guarantees."""

    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / LEDGER_FILENAME
        is_new = not self.path.exists()
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,  # explicit BEGIN/COMMIT below
            check_same_thread=False,  # trio.to_thread may use any worker; the lock serialises
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if is_new:
            os.chmod(self.path, 0o600)
            _fsync_dir(data_dir)  # make the new file's directory entry durable too

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    # --- channels ---------------------------------------------------------------------

    def add_channel(self, record: ChannelRecord) -> None:
        """Remember a channel; re-adding it with the same client key updates the deposit."""
        key = str(record.channel_id)
        with self._lock, self._transaction():
            row = self._db.execute(
                "SELECT client_key FROM channels WHERE channel_id = ?", (key,)
            ).fetchone()
            if row is not None and bytes(row[0]) != record.client_key:
                raise ChannelConflict(f"channel {record.channel_id:#x} has another client key")
            self._db.execute(
                "INSERT INTO channels(channel_id, client_key, deposit, opened_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT(channel_id) DO UPDATE SET"
                " deposit = excluded.deposit",
                (key, record.client_key, str(record.deposit), record.opened_at),
            )

    def channel(self, channel_id: int) -> ChannelRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT client_key, deposit, opened_at FROM channels WHERE channel_id = ?",
                (str(channel_id),),
            ).fetchone()
        if row is None:
            return None
        return ChannelRecord(channel_id, bytes(row[0]), int(row[1]), float(row[2]))

    # --- vouchers ---------------------------------------------------------------------

    def record_voucher(self, voucher: Voucher, accepted_at: float) -> None:
        """Store ``voucher`` as its channel's latest; durable (fsynced) on return."""
        key = str(voucher.channel_id)
        with self._lock, self._transaction():
            known = self._db.execute("SELECT 1 FROM channels WHERE channel_id = ?", (key,))
            if known.fetchone() is None:
                raise UnknownChannel(f"channel {voucher.channel_id:#x} was never added")
            row = self._db.execute(
                "SELECT seqno, sent FROM vouchers WHERE channel_id = ?", (key,)
            ).fetchone()
            if row is not None and (voucher.seqno <= int(row[0]) or voucher.sent < int(row[1])):
                raise StaleVoucher(
                    f"seqno {voucher.seqno}/sent {voucher.sent} does not advance "
                    f"stored seqno {row[0]}/sent {row[1]}"
                )
            self._db.execute(
                "INSERT INTO vouchers(channel_id, seqno, sent, boc, accepted_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(channel_id) DO UPDATE SET"
                " seqno = excluded.seqno, sent = excluded.sent, boc = excluded.boc,"
                " accepted_at = excluded.accepted_at",
                (key, voucher.seqno, str(voucher.sent), voucher.to_boc(), accepted_at),
            )

    def latest_voucher(self, channel_id: int) -> StoredVoucher | None:
        with self._lock:
            row = self._db.execute(
                "SELECT boc, accepted_at FROM vouchers WHERE channel_id = ?", (str(channel_id),)
            ).fetchone()
        if row is None:
            return None
        return StoredVoucher(parse_voucher(bytes(row[0])), float(row[1]))

    # --- usage ------------------------------------------------------------------------

    def record_usage(self, usage: JobUsage) -> None:
        """Upsert a job's cumulative usage (the job's counts only ever grow)."""
        with self._lock, self._transaction():
            try:
                self._db.execute(
                    "INSERT INTO usage(job_id, channel_id, prompt_tokens, completion_tokens,"
                    " cost, updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(job_id) DO UPDATE"
                    " SET prompt_tokens = excluded.prompt_tokens,"
                    " completion_tokens = excluded.completion_tokens, cost = excluded.cost,"
                    " updated_at = excluded.updated_at",
                    (
                        usage.job_id,
                        str(usage.channel_id),
                        usage.prompt_tokens,
                        usage.completion_tokens,
                        str(usage.cost),
                        usage.updated_at,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise UnknownChannel(f"channel {usage.channel_id:#x} was never added") from exc

    def usage(self, job_id: str) -> JobUsage | None:
        with self._lock:
            row = self._db.execute(
                "SELECT channel_id, prompt_tokens, completion_tokens, cost, updated_at"
                " FROM usage WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        return JobUsage(job_id, int(row[0]), int(row[1]), int(row[2]), int(row[3]), float(row[4]))

    def channel_owed(self, channel_id: int) -> int:
        """Total cost of all recorded jobs on a channel (a meter's ``owed_before``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT cost FROM usage WHERE channel_id = ?", (str(channel_id),)
            ).fetchall()
        return sum(int(r[0]) for r in rows)

    def totals(self) -> LedgerTotals:
        # Amounts are TEXT (uint128 does not fit sqlite's INTEGER): summed in Python.
        with self._lock:
            channels = self._db.execute("SELECT COUNT(*) FROM channels").fetchone()[0]
            sent = self._db.execute("SELECT sent FROM vouchers").fetchall()
            costs = self._db.execute("SELECT cost FROM usage").fetchall()
        return LedgerTotals(
            channels=int(channels),
            paid_nanoton=sum(int(r[0]) for r in sent),
            jobs=len(costs),
            billed_nanoton=sum(int(r[0]) for r in costs),
        )


@dataclass(frozen=True)
class LedgerTotals:
    """Sums over the whole ledger, for metrics and `meshnode status`."""

    channels: int  # channels ever added
    paid_nanoton: int  # sum of each channel's latest voucher `sent`: earned (provider side)
    jobs: int  # jobs with recorded usage
    billed_nanoton: int  # sum of the jobs' recorded cost


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error); the commit is the fsync point."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self._db.execute("COMMIT")
        else:
            self._db.execute("ROLLBACK")
