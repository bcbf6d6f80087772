"""DCAP collateral (TCB info, QE identity, CRLs) from a PCCS, cached on disk.

Verification needs only the cache, so a client that fetched collateral once verifies
offline until the collateral's nextUpdate. Fetching is the only network step here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import dcap_qvl
import trio

from meshnode.core.errors import MeshnodeError

log = logging.getLogger(__name__)

# A PCCS answers in well under a second; 20 s covers a slow Intel PCS round trip
# (several requests per quote) without stalling a client's directory refresh.
COLLATERAL_FETCH_TIMEOUT_S = 20.0
# Collateral JSON for one FMSPC is ~30 KB (PCK CRL dominates); 1 MiB means corruption.
MAX_COLLATERAL_FILE_BYTES = 1024 * 1024


class CollateralError(MeshnodeError, RuntimeError):
    """Collateral could not be fetched, read or parsed."""

    label = "collateral"


def collateral_key(raw_quote: bytes) -> str:
    """Cache key: TEE type, FMSPC and PCK CA name identify the collateral a quote needs."""
    try:
        q = dcap_qvl.parse_quote(raw_quote)
        return f"{q.quote_type().lower()}-{q.fmspc().upper()}-{q.ca()}"
    except ValueError as exc:
        raise CollateralError(f"cannot read FMSPC/CA from the quote: {exc}") from exc


def load_collateral_json(text: str) -> Any:
    """QuoteCollateralV3 from the JSON format of dcap-qvl (and of the test fixtures)."""
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except ValueError as exc:
        raise CollateralError(f"collateral JSON is invalid: {exc}") from exc


def collateral_next_update(collateral: Any) -> float:
    """Earliest nextUpdate of the TCB info and QE identity (unix seconds)."""
    times = []
    for doc in (collateral.tcb_info, collateral.qe_identity):
        stamp = json.loads(doc)["nextUpdate"]
        times.append(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    return min(times)


class CollateralCache:
    """One JSON file per (TEE, FMSPC, CA) under `directory`; fetched from `pccs_url`."""

    def __init__(self, directory: Path, pccs_url: str) -> None:
        self.directory = directory
        self.pccs_url = pccs_url

    def _path(self, raw_quote: bytes) -> Path:
        return self.directory / f"{collateral_key(raw_quote)}.json"

    def load(self, raw_quote: bytes) -> Any | None:
        """Cached collateral for this quote's platform, or None (fresh or not)."""
        path = self._path(raw_quote)
        if not path.is_file():
            return None
        if path.stat().st_size > MAX_COLLATERAL_FILE_BYTES:
            raise CollateralError(f"{path} is larger than {MAX_COLLATERAL_FILE_BYTES} bytes")
        return load_collateral_json(path.read_text())

    def store(self, raw_quote: bytes, collateral: Any) -> Path:
        """Write atomically so a concurrent reader never sees half a file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(raw_quote)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".collateral-")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(collateral.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    async def fetch(self, raw_quote: bytes, timeout_s: float = COLLATERAL_FETCH_TIMEOUT_S) -> Any:
        """Download collateral from the PCCS and cache it. Network; bounded by timeout."""
        url = self.pccs_url

        def blocking() -> Any:
            # dcap-qvl's fetcher is an asyncio coroutine; give it its own loop in a thread.
            async def run() -> Any:
                return await asyncio.wait_for(dcap_qvl.get_collateral(url, raw_quote), timeout_s)

            return asyncio.run(run())

        try:
            with trio.fail_after(timeout_s):
                # trio-stubs (trio_typing) shadows trio's own hints and predates this kwarg.
                collateral = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                    blocking, abandon_on_cancel=True
                )
        except trio.TooSlowError as exc:
            raise CollateralError(f"PCCS {url} did not answer within {timeout_s} s") from exc
        except (ValueError, RuntimeError, TimeoutError) as exc:
            raise CollateralError(f"PCCS {url}: {exc}") from exc
        await trio.to_thread.run_sync(self.store, raw_quote, collateral)
        return collateral

    async def get(self, raw_quote: bytes, now: float) -> Any | None:
        """Fresh cached collateral, else fetched; stale cache if the PCCS is unreachable."""
        cached = self.load(raw_quote)
        if cached is not None and collateral_next_update(cached) > now:
            return cached
        try:
            return await self.fetch(raw_quote)
        except CollateralError as exc:
            log.warning(
                "collateral refresh failed, using %s: %s",
                "stale cache" if cached is not None else "nothing",
                exc,
            )
            return cached
