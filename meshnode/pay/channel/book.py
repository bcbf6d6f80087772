"""Which channel contracts a node takes part in: their configs, on disk.

The ledger keeps vouchers and usage; this keeps what is needed to find and close each
channel after a restart (its full config, hence its address, and the counterparty's
signed zero state for an uncooperative close). One small JSON file per channel, named by
the contract address (ids are chosen by clients and may repeat across them), written
atomically (temp file, fsync, rename, fsync of the folder) with mode 0600. Blocking:
the shell calls it through a worker thread.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell

from meshnode.pay.contract.cells import ChannelConfig, ClosingConfig, channel_address
from meshnode.pay.ton.onchain import raw_address

BOOK_DIR = "channels"
MAX_BOOK_FILE_BYTES = 16 * 1024
"""A channel file is ~1 kB; anything far larger is not ours and is not parsed."""


class ChannelBookError(Exception):
    """A channel file is missing or unreadable."""


@dataclass(frozen=True, slots=True)
class BookEntry:
    config: ChannelConfig
    address: Address
    deposit: int
    """Party A's balance when the channel was opened (what vouchers may reach)."""
    counter_state: bytes | None = None
    """The other party's signed semi-channel state (BOC), needed to close unilaterally."""
    peer_id: str | None = None
    """The client's note of the provider's peer id (to reach it to close the channel)."""


def _config_to_json(config: ChannelConfig) -> dict[str, Any]:
    return {
        "channel_id": str(config.channel_id),
        "key_a": config.key_a.hex(),
        "key_b": config.key_b.hex(),
        "address_a": raw_address(config.address_a),
        "address_b": raw_address(config.address_b),
        "quarantine_duration": config.closing.quarantine_duration,
        "misbehavior_fine": str(config.closing.misbehavior_fine),
        "conditional_close_duration": config.closing.conditional_close_duration,
        "excess_fee": str(config.excess_fee),
    }


def _config_from_json(d: dict[str, Any]) -> ChannelConfig:
    return ChannelConfig(
        channel_id=int(d["channel_id"]),
        key_a=bytes.fromhex(d["key_a"]),
        key_b=bytes.fromhex(d["key_b"]),
        address_a=Address(d["address_a"]),
        address_b=Address(d["address_b"]),
        closing=ClosingConfig(
            quarantine_duration=int(d["quarantine_duration"]),
            misbehavior_fine=int(d["misbehavior_fine"]),
            conditional_close_duration=int(d["conditional_close_duration"]),
        ),
        excess_fee=int(d["excess_fee"]),
    )


class ChannelBook:
    def __init__(self, data_dir: Path, code: Cell) -> None:
        self.dir = data_dir / BOOK_DIR
        self._code = code

    def _path(self, address: Address) -> Path:
        return self.dir / f"{address.wc}_{bytes(address.hash_part).hex()}.json"

    def save(self, entry: BookEntry) -> None:
        if channel_address(self._code, entry.config) != entry.address:
            raise ChannelBookError("the address does not match the channel config")
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {
            "config": _config_to_json(entry.config),
            "deposit": str(entry.deposit),
            "counter_state": entry.counter_state.hex() if entry.counter_state else None,
            "peer_id": entry.peer_id,
        }
        path = self._path(entry.address)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self, channel_id: int) -> BookEntry | None:
        """This node's channel with that id (a client picks unique ids for its own)."""
        found = [e for e in self.all() if e.config.channel_id == channel_id]
        if len(found) > 1:
            raise ChannelBookError(f"{len(found)} channels with id {channel_id:#x} here")
        return found[0] if found else None

    def at(self, address: Address) -> BookEntry | None:
        path = self._path(address)
        return self._read(path) if path.exists() else None

    def all(self) -> list[BookEntry]:
        if not self.dir.exists():
            return []
        return [self._read(p) for p in sorted(self.dir.glob("*.json"))]

    def _read(self, path: Path) -> BookEntry:
        try:
            if path.stat().st_size > MAX_BOOK_FILE_BYTES:
                raise ValueError("file too large")
            doc = json.loads(path.read_text(encoding="utf-8"))
            config = _config_from_json(doc["config"])
            counter = doc["counter_state"]
            entry = BookEntry(
                config=config,
                address=channel_address(self._code, config),
                deposit=int(doc["deposit"]),
                counter_state=bytes.fromhex(counter) if counter else None,
                peer_id=doc.get("peer_id"),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ChannelBookError(f"{path} is unreadable: {exc}") from exc
        return entry
