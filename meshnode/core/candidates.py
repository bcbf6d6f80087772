"""What the router ranks: one provider of one model (``Candidate``), the job it is ranked
for (``JobEstimate``), and many candidates held as columns (``CandidateTable``).

The table exists for speed. Ranking 10,000 candidates one Python object at a time takes
about 50 ms (measured with ``python -m meshnode.lab profile``); as numpy columns it takes
well under one. ``Router.choose`` builds a table from a list for every call, so a node
and the routing lab run the same ranking code; the lab also keeps long-lived tables and
updates one row per advert instead of rebuilding them for every job.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from meshnode.core.directory import Provider

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]

# Rows are stored in arrays that double when full: a table grows from a handful of
# providers to ten thousand in a dozen copies.
INITIAL_TABLE_ROWS = 16


@dataclass(frozen=True)
class Candidate:
    """A provider of one model, as the router sees it."""

    peer_id: str
    model_id: str
    price_prompt_per_1k: int  # nanoton
    price_completion_per_1k: int  # nanoton
    slots: int
    busy_slots: int
    queue_len: int
    tokens_per_s: float  # advertised
    verified: bool

    @classmethod
    def from_provider(cls, provider: Provider) -> Candidate:
        advert = provider.advert
        return cls(
            peer_id=advert.peer_id,
            model_id=provider.offer.id,
            price_prompt_per_1k=provider.offer.price_prompt_per_1k,
            price_completion_per_1k=provider.offer.price_completion_per_1k,
            slots=advert.capacity.slots,
            busy_slots=advert.load.busy_slots,
            queue_len=advert.load.queue_len,
            tokens_per_s=advert.capacity.tokens_per_s,
            verified=provider.listing.verified,
        )


@dataclass(frozen=True)
class JobEstimate:
    model_id: str
    prompt_tokens: int
    completion_tokens: int  # max_tokens, or a better guess if the caller has one
    max_price_prompt_per_1k: int | None = None  # nanoton; None = no cap
    max_price_completion_per_1k: int | None = None

    def cost_nanoton(self, c: Candidate) -> float:
        return (
            self.prompt_tokens * c.price_prompt_per_1k
            + self.completion_tokens * c.price_completion_per_1k
        ) / 1000.0


class CandidateTable:
    """Candidates as numpy columns, one row per peer id, in insertion order.

    ``upsert`` replaces a peer's row in place (an advert with new load) or appends one;
    ``remove`` moves the last row into the gap. Row order is therefore deterministic
    for a given sequence of calls, which is all the seeded strategies need.
    ``expires_at`` lets a long-lived table hold adverts past their lifetime: rows whose
    advert has expired at ``now`` are not eligible.
    """

    def __init__(self, candidates: Iterable[Candidate] = (), *, capacity: int = 0) -> None:
        self._n = 0
        self._ids: list[str] = []
        self._rows: dict[str, int] = {}
        self._items: list[Candidate] = []
        self._models: dict[str, int] = {}
        size = max(INITIAL_TABLE_ROWS, capacity)
        self.model: Ints = np.zeros(size, dtype=np.int64)
        self.price_prompt: Floats = np.zeros(size)
        self.price_completion: Floats = np.zeros(size)
        self.slots: Floats = np.zeros(size)
        self.busy: Floats = np.zeros(size)
        self.queue: Floats = np.zeros(size)
        self.tokens_per_s: Floats = np.zeros(size)
        self.verified: Bools = np.zeros(size, dtype=np.bool_)
        self.expires_at: Floats = np.zeros(size)
        items = list(candidates)
        if len({c.peer_id for c in items}) == len(items):
            self._fill(items)
        else:  # duplicates: the last row of a peer id wins, as with upsert
            for c in items:
                self.upsert(c)

    _COLUMNS = (
        "model", "price_prompt", "price_completion", "slots", "busy", "queue",
        "tokens_per_s", "verified", "expires_at",
    )  # fmt: skip

    def __len__(self) -> int:
        return self._n

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._rows

    def row_of(self, peer_id: str) -> int | None:
        return self._rows.get(peer_id)

    def peer_id(self, row: int) -> str:
        return self._ids[row]

    def candidate(self, row: int) -> Candidate:
        return self._items[row]

    def model_code(self, model_id: str) -> int | None:
        """The integer the ``model`` column uses for ``model_id``; None if no row has it."""
        return self._models.get(model_id)

    def _fill(self, items: list[Candidate]) -> None:
        """Bulk load into an empty table: one array per column, not one row at a time."""
        n = len(items)
        while len(self.model) < n:
            self._grow()
        self._n = n
        self._ids = [c.peer_id for c in items]
        self._rows = {pid: row for row, pid in enumerate(self._ids)}
        self._items = items
        codes = [self._models.setdefault(c.model_id, len(self._models)) for c in items]
        self.model[:n] = codes
        self.price_prompt[:n] = [c.price_prompt_per_1k for c in items]
        self.price_completion[:n] = [c.price_completion_per_1k for c in items]
        self.slots[:n] = [c.slots for c in items]
        self.busy[:n] = [c.busy_slots for c in items]
        self.queue[:n] = [c.queue_len for c in items]
        self.tokens_per_s[:n] = [c.tokens_per_s for c in items]
        self.verified[:n] = [c.verified for c in items]
        self.expires_at[:n] = math.inf

    def _grow(self) -> None:
        for name in self._COLUMNS:
            old = getattr(self, name)
            new = np.zeros(2 * len(old), dtype=old.dtype)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)

    def upsert(self, c: Candidate, expires_at: float = math.inf) -> int:
        """Insert or replace the row of ``c.peer_id``; its row index."""
        row = self._rows.get(c.peer_id)
        if row is None:
            if self._n == len(self.model):
                self._grow()
            row = self._n
            self._n += 1
            self._rows[c.peer_id] = row
            self._ids.append(c.peer_id)
            self._items.append(c)
        else:
            self._items[row] = c
        code = self._models.setdefault(c.model_id, len(self._models))
        self.model[row] = code
        self.price_prompt[row] = c.price_prompt_per_1k
        self.price_completion[row] = c.price_completion_per_1k
        self.slots[row] = c.slots
        self.busy[row] = c.busy_slots
        self.queue[row] = c.queue_len
        self.tokens_per_s[row] = c.tokens_per_s
        self.verified[row] = c.verified
        self.expires_at[row] = expires_at
        return row

    def remove(self, peer_id: str) -> bool:
        """Drop a peer's row (the last row takes its place); False if it had none."""
        row = self._rows.pop(peer_id, None)
        if row is None:
            return False
        last = self._n - 1
        if row != last:
            moved = self._ids[last]
            self._ids[row] = moved
            self._items[row] = self._items[last]
            self._rows[moved] = row
            for name in self._COLUMNS:
                column = getattr(self, name)
                column[row] = column[last]
        self._ids.pop()
        self._items.pop()
        self._n = last
        return True
