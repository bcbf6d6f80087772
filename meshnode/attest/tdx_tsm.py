"""TDX quotes from the kernel's configfs-tsm interface (Linux 6.7+, TDX guest).

Protocol (Documentation/ABI/testing/configfs-tsm): mkdir an entry under
/sys/kernel/config/tsm/report, write 64 bytes to `inblob`, read the quote from
`outblob`. `generation` counts inblob writes; if it moved between our write and our
read, another process reused the entry and the outblob is not ours, so retry.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from meshnode.attest.evidence import KIND_TDX, Evidence, EvidenceUnavailableError
from meshnode.core.attest_binding import REPORT_DATA_LEN
from meshnode.core.errors import MeshnodeError

DEFAULT_TSM_ROOT = Path("/sys/kernel/config/tsm/report")
# The `provider` attribute names the TEE driver behind configfs-tsm.
TDX_PROVIDER = "tdx_guest"
# Another writer can race us at most a few times in practice; more means a livelock.
MAX_QUOTE_ATTEMPTS = 3
# Quote header fields used for a sanity check: version 4 or 5, TEE type TDX.
_SUPPORTED_QUOTE_VERSIONS = (4, 5)
_TEE_TYPE_TDX = 0x81
# A TDX quote's header plus TD report body; anything shorter is not a quote.
_MIN_QUOTE_LEN = 48 + 584


class QuoteGenerationError(MeshnodeError, RuntimeError):
    """The kernel returned no usable quote."""

    label = "TDX quote failed"


class TdxEvidenceProducer:
    """Produces `tdx` evidence through configfs-tsm rooted at `tsm_root`."""

    kind = KIND_TDX

    def __init__(self, tsm_root: Path = DEFAULT_TSM_ROOT, entry_name: str | None = None) -> None:
        self.tsm_root = tsm_root
        # One entry per process, reused across quotes (configfs allows rewriting inblob).
        self.entry = tsm_root / (entry_name or f"meshnode-{os.getpid()}")

    def check_available(self) -> None:
        """Raise EvidenceUnavailableError naming what is missing when not inside a TD."""
        if not self.tsm_root.is_dir():
            raise EvidenceUnavailableError(
                f"{self.tsm_root} does not exist: not inside a TDX guest, or the kernel "
                "lacks CONFIG_TSM_REPORTS / CONFIG_TDX_GUEST_DRIVER, or configfs is not "
                "mounted (mount -t configfs none /sys/kernel/config)"
            )
        if not os.access(self.tsm_root, os.W_OK):
            raise EvidenceUnavailableError(
                f"{self.tsm_root} is not writable by this user: run the provider as root "
                "or grant it access to configfs-tsm"
            )

    def _entry_dir(self) -> Path:
        self.check_available()
        if not self.entry.is_dir():
            self.entry.mkdir()
        provider = self.entry / "provider"
        if provider.exists():
            name = provider.read_text().strip()
            if name != TDX_PROVIDER:
                raise EvidenceUnavailableError(
                    f"configfs-tsm provider is {name!r}, not {TDX_PROVIDER!r}: "
                    "this TEE is not Intel TDX"
                )
        return self.entry

    def produce(self, report_data: bytes) -> Evidence:
        if len(report_data) != REPORT_DATA_LEN:
            raise ValueError(f"report_data must be {REPORT_DATA_LEN} bytes")
        entry = self._entry_dir()
        for _ in range(MAX_QUOTE_ATTEMPTS):
            (entry / "inblob").write_bytes(report_data)
            before = _read_generation(entry)
            try:
                quote = (entry / "outblob").read_bytes()
            except OSError as exc:
                # The kernel fails this read when the host's quote service is unreachable.
                raise QuoteGenerationError(
                    f"reading {entry / 'outblob'} failed: {exc.strerror} "
                    "(is the host's TDX quote generation service running?)"
                ) from exc
            if _read_generation(entry) == before:
                _check_quote(quote)
                return Evidence(kind=KIND_TDX, blob=quote)
        raise QuoteGenerationError(
            f"configfs-tsm entry {entry} kept changing under us ({MAX_QUOTE_ATTEMPTS} tries)"
        )

    def close(self) -> None:
        """Remove the configfs entry (the kernel frees its buffers)."""
        if self.entry.is_dir():
            self.entry.rmdir()


def _read_generation(entry: Path) -> str | None:
    gen = entry / "generation"
    return gen.read_text().strip() if gen.exists() else None


def _check_quote(quote: bytes) -> None:
    if len(quote) < _MIN_QUOTE_LEN:
        raise QuoteGenerationError(
            f"outblob holds {len(quote)} bytes, not a TDX quote (is the QGS reachable?)"
        )
    version, _key_type, tee_type = struct.unpack_from("<HHI", quote)
    if version not in _SUPPORTED_QUOTE_VERSIONS or tee_type != _TEE_TYPE_TDX:
        raise QuoteGenerationError(
            f"outblob is not a TDX quote (version {version}, TEE type {tee_type:#x})"
        )
