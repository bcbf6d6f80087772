"""Durable record of channels, the latest accepted voucher per channel, and job usage.

A channel is known by its ``ChannelRef``: the channel id *and* party A's key. The id
alone is public and anyone may deploy a contract with it, so keying by it let a
stranger who announced a victim's id first get the victim's funded channel refused.
Each record also keeps the contract address (a function of id, both keys and both
wallets) that the channel service checked on chain, and the channel's state: ``open``,
``closing`` (a close is co-signed or under way: no new job) or ``closed``.

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
from typing import Any

from meshnode.core.voucher import Voucher, parse_voucher

LEDGER_FILENAME = "ledger.sqlite3"

BUSY_TIMEOUT_S = 10.0
"""How long a write waits for another connection's lock before failing loudly."""

SCHEMA_VERSION = 2
"""2: channels keyed by (id, client key), with address and state; usage has `complete`."""

STATE_OPEN = "open"
STATE_CLOSING = "closing"
STATE_CLOSED = "closed"
STATES = (STATE_OPEN, STATE_CLOSING, STATE_CLOSED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS channels (
    ref TEXT PRIMARY KEY,
    channel_id TEXT NOT NULL,
    client_key BLOB NOT NULL,
    address TEXT NOT NULL,
    deposit TEXT NOT NULL,
    opened_at REAL NOT NULL,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS vouchers (
    ref TEXT PRIMARY KEY REFERENCES channels(ref),
    seqno INTEGER NOT NULL,
    sent TEXT NOT NULL,
    boc BLOB NOT NULL,
    accepted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS usage (
    job_id TEXT PRIMARY KEY,
    ref TEXT NOT NULL REFERENCES channels(ref),
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost TEXT NOT NULL,
    updated_at REAL NOT NULL,
    complete INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_by_ref ON usage(ref, updated_at);
"""

_MIGRATE_FROM_V1 = """
ALTER TABLE channels RENAME TO channels_v1;
ALTER TABLE vouchers RENAME TO vouchers_v1;
ALTER TABLE usage RENAME TO usage_v1;
{schema}
INSERT INTO channels(ref, channel_id, client_key, address, deposit, opened_at, state)
    SELECT channel_id || ':' || lower(hex(client_key)), channel_id, client_key, '',
           deposit, opened_at, 'open' FROM channels_v1;
INSERT INTO vouchers(ref, seqno, sent, boc, accepted_at)
    SELECT c.channel_id || ':' || lower(hex(c.client_key)), v.seqno, v.sent, v.boc,
           v.accepted_at FROM vouchers_v1 v JOIN channels_v1 c USING (channel_id);
INSERT INTO usage(job_id, ref, prompt_tokens, completion_tokens, cost, updated_at, complete)
    SELECT u.job_id, c.channel_id || ':' || lower(hex(c.client_key)), u.prompt_tokens,
           u.completion_tokens, u.cost, u.updated_at, 1
    FROM usage_v1 u JOIN channels_v1 c USING (channel_id);
DROP TABLE usage_v1;
DROP TABLE vouchers_v1;
DROP TABLE channels_v1;
"""


class LedgerError(Exception):
    """Base class for ledger failures the caller should surface."""


class UnknownChannel(LedgerError):
    """A voucher or usage row for a channel that was never added."""


class ChannelConflict(LedgerError):
    """The channel is already recorded at another contract address."""


class StaleVoucher(LedgerError):
    """A voucher that does not advance the stored one (lower or equal seqno, lower sent)."""


@dataclass(frozen=True, slots=True)
class ChannelRef:
    """Which channel: its id and party A's (the client's) public key."""

    channel_id: int
    client_key: bytes

    @property
    def key(self) -> str:
        return f"{self.channel_id}:{self.client_key.hex()}"

    def __str__(self) -> str:
        return f"{self.channel_id:#x}/{self.client_key.hex()[:8]}"


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    channel_id: int
    client_key: bytes
    deposit: int
    opened_at: float
    address: str = ""
    """The contract address, raw ``wc:hex`` ("" for channels recorded before v2)."""
    state: str = STATE_OPEN

    @property
    def ref(self) -> ChannelRef:
        return ChannelRef(self.channel_id, self.client_key)

    @property
    def is_open(self) -> bool:
        return self.state == STATE_OPEN


@dataclass(frozen=True, slots=True)
class StoredVoucher:
    voucher: Voucher
    accepted_at: float


@dataclass(frozen=True, slots=True)
class JobUsage:
    job_id: str
    ref: ChannelRef
    prompt_tokens: int
    completion_tokens: int
    cost: int
    updated_at: float
    complete: bool = True
    """False while the job runs, and for a job that ended before its Done."""

    @property
    def channel_id(self) -> int:
        return self.ref.channel_id


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
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            has_v1 = version == 1 or (
                version == 0
                and self._db.execute(
                    "SELECT 1 FROM sqlite_master WHERE name = 'channels'"
                ).fetchone() is not None
            )
            script = _MIGRATE_FROM_V1.format(schema=_SCHEMA) if has_v1 else _SCHEMA
            for statement in script.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        if is_new:
            os.chmod(self.path, 0o600)
            _fsync_dir(data_dir)  # make the new file's directory entry durable too

    def durability(self) -> tuple[str, int]:
        """(journal_mode, synchronous) of this ledger's own connection, as sqlite reports
        them: ("wal", 2) is WAL with synchronous=FULL. Both are per connection, so only
        this connection can show what the ledger's commits do."""
        with self._lock:
            mode = self._db.execute("PRAGMA journal_mode").fetchone()[0]
            sync = self._db.execute("PRAGMA synchronous").fetchone()[0]
        return str(mode), int(sync)

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
        """Remember a channel; re-adding it at the same address updates the deposit."""
        key = record.ref.key
        with self._lock, self._transaction():
            row = self._db.execute(
                "SELECT address FROM channels WHERE ref = ?", (key,)
            ).fetchone()
            if row is not None and row[0] and record.address and row[0] != record.address:
                raise ChannelConflict(
                    f"channel {record.ref} is recorded at {row[0]}, not {record.address}"
                )
            self._db.execute(
                "INSERT INTO channels(ref, channel_id, client_key, address, deposit, opened_at,"
                " state) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(ref) DO UPDATE SET"
                " deposit = excluded.deposit,"
                " address = CASE WHEN address = '' THEN excluded.address ELSE address END",
                (key, str(record.channel_id), record.client_key, record.address,
                 str(record.deposit), record.opened_at, record.state),
            )

    def channel(self, ref: ChannelRef) -> ChannelRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT channel_id, client_key, deposit, opened_at, address, state"
                " FROM channels WHERE ref = ?",
                (ref.key,),
            ).fetchone()
        return None if row is None else _record(row)

    def channels(self) -> list[ChannelRecord]:
        """Every channel, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT channel_id, client_key, deposit, opened_at, address, state"
                " FROM channels ORDER BY opened_at, ref"
            ).fetchall()
        return [_record(row) for row in rows]

    def set_state(self, ref: ChannelRef, state: str) -> None:
        """Move a channel to ``closing`` or ``closed`` (never back to ``open``)."""
        if state not in STATES:
            raise ValueError(f"unknown channel state {state!r}")
        with self._lock, self._transaction():
            row = self._db.execute("SELECT state FROM channels WHERE ref = ?", (ref.key,))
            current = row.fetchone()
            if current is None:
                raise UnknownChannel(f"channel {ref} was never added")
            if STATES.index(state) < STATES.index(current[0]):
                return  # a closed channel never reopens
            self._db.execute("UPDATE channels SET state = ? WHERE ref = ?", (state, ref.key))

    # --- vouchers ---------------------------------------------------------------------

    def record_voucher(self, ref: ChannelRef, voucher: Voucher, accepted_at: float) -> None:
        """Store ``voucher`` as its channel's latest; durable (fsynced) on return."""
        if voucher.channel_id != ref.channel_id:
            raise UnknownChannel(f"voucher for {voucher.channel_id:#x} filed under {ref}")
        key = ref.key
        with self._lock, self._transaction():
            known = self._db.execute("SELECT 1 FROM channels WHERE ref = ?", (key,))
            if known.fetchone() is None:
                raise UnknownChannel(f"channel {ref} was never added")
            row = self._db.execute(
                "SELECT seqno, sent FROM vouchers WHERE ref = ?", (key,)
            ).fetchone()
            if row is not None and (voucher.seqno <= int(row[0]) or voucher.sent < int(row[1])):
                raise StaleVoucher(
                    f"seqno {voucher.seqno}/sent {voucher.sent} does not advance "
                    f"stored seqno {row[0]}/sent {row[1]}"
                )
            self._db.execute(
                "INSERT INTO vouchers(ref, seqno, sent, boc, accepted_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT(ref) DO UPDATE SET"
                " seqno = excluded.seqno, sent = excluded.sent, boc = excluded.boc,"
                " accepted_at = excluded.accepted_at",
                (key, voucher.seqno, str(voucher.sent), voucher.to_boc(), accepted_at),
            )

    def latest_voucher(self, ref: ChannelRef) -> StoredVoucher | None:
        with self._lock:
            row = self._db.execute(
                "SELECT boc, accepted_at FROM vouchers WHERE ref = ?", (ref.key,)
            ).fetchone()
        if row is None:
            return None
        return StoredVoucher(parse_voucher(bytes(row[0])), float(row[1]))

    # --- usage ------------------------------------------------------------------------

    def record_usage(self, usage: JobUsage) -> None:
        """Upsert a job's cumulative usage (the job's counts only ever grow)."""
        with self._lock, self._transaction():
            known = self._db.execute("SELECT 1 FROM channels WHERE ref = ?", (usage.ref.key,))
            if known.fetchone() is None:
                raise UnknownChannel(f"channel {usage.ref} was never added")
            self._db.execute(
                "INSERT INTO usage(job_id, ref, prompt_tokens, completion_tokens, cost,"
                " updated_at, complete) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(job_id)"
                " DO UPDATE SET prompt_tokens = excluded.prompt_tokens,"
                " completion_tokens = excluded.completion_tokens, cost = excluded.cost,"
                " updated_at = excluded.updated_at, complete = excluded.complete",
                (
                    usage.job_id,
                    usage.ref.key,
                    usage.prompt_tokens,
                    usage.completion_tokens,
                    str(usage.cost),
                    usage.updated_at,
                    int(usage.complete),
                ),
            )

    def usage(self, job_id: str) -> JobUsage | None:
        with self._lock:
            row = self._db.execute(
                "SELECT u.job_id, c.channel_id, c.client_key, u.prompt_tokens,"
                " u.completion_tokens, u.cost, u.updated_at, u.complete"
                " FROM usage u JOIN channels c USING (ref) WHERE u.job_id = ?",
                (job_id,),
            ).fetchone()
        return None if row is None else _usage(row)

    def jobs(self, ref: ChannelRef) -> list[JobUsage]:
        """Every job on a channel, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT u.job_id, c.channel_id, c.client_key, u.prompt_tokens,"
                " u.completion_tokens, u.cost, u.updated_at, u.complete"
                " FROM usage u JOIN channels c USING (ref) WHERE u.ref = ?"
                " ORDER BY u.updated_at, u.job_id",
                (ref.key,),
            ).fetchall()
        return [_usage(row) for row in rows]

    def channel_owed(self, ref: ChannelRef) -> int:
        """Total cost of all recorded jobs on a channel (a meter's ``owed_before``)."""
        with self._lock:
            rows = self._db.execute("SELECT cost FROM usage WHERE ref = ?", (ref.key,)).fetchall()
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


def _record(row: Any) -> ChannelRecord:
    channel_id, client_key, deposit, opened_at, address, state = row
    return ChannelRecord(
        int(str(channel_id)),
        bytes(client_key),
        int(str(deposit)),
        float(opened_at),
        str(address),
        str(state),
    )


def _usage(row: Any) -> JobUsage:
    job_id, channel_id, client_key, prompt, completion, cost, updated_at, complete = row
    return JobUsage(
        str(job_id),
        ChannelRef(int(str(channel_id)), bytes(client_key)),
        int(prompt),
        int(completion),
        int(str(cost)),
        float(updated_at),
        bool(complete),
    )


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
