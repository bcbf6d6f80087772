"""The official payment-channel contract code: fetched at set-up time, cached outside git.

The compiled code ships in the npm package ``tonweb`` (``PAYMENT_CHANNEL_CODE_HEX`` in
its PaymentChannel source). We fetch the package tarball with ``npm pack`` (no install,
no scripts run), pull out the hex, and accept it only if its cell hash is the published
code hash. The repository never contains the code itself.

Run ``python -m meshnode.pay.contract.code`` once to fill the cache.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from pytoniq_core.boc.cell import Cell

from meshnode.core.errors import EXIT_USAGE, MeshnodeError
from meshnode.core.voucher import cell_to_boc

PAYMENT_CHANNEL_CODE_HASH = "41f5b77f02d4a96eb465197215ed00923720a6c731fa32934f9c0e80ffb85589"

TONWEB_PACKAGE = "tonweb@0.0.66"
"""A pinned release; any version is fine as long as the code hash matches."""

TONWEB_SOURCE_MEMBER = "package/src/contract/payments/PaymentChannel.js"

NPM_PACK_TIMEOUT_S = 180.0
"""npm pack downloads one ~1 MB tarball; minutes means the registry is unreachable."""

MAX_SOURCE_BYTES = 1 << 20
"""The JS source is ~22 kB; refuse anything absurd before reading it into memory."""

CACHE_ENV = "MESHNODE_TON_CACHE"
CODE_FILENAME = "payment-channel.boc"

_HEX_RE = re.compile(r"PAYMENT_CHANNEL_CODE_HEX\s*=\s*['\"]([0-9A-Fa-f]+)['\"]")


class ContractCodeError(MeshnodeError, RuntimeError):
    """The contract code is missing, unreadable, or not the published contract."""

    exit_code = EXIT_USAGE
    label = "contract code"


def default_cache_dir() -> Path:
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "meshnode" / "ton"


def _checked(code: Cell, origin: str) -> Cell:
    actual = bytes(code.hash).hex()
    if actual != PAYMENT_CHANNEL_CODE_HASH:
        raise ContractCodeError(
            f"payment-channel code from {origin} has hash {actual}, "
            f"expected {PAYMENT_CHANNEL_CODE_HASH}"
        )
    return code


def load_payment_channel_code(cache_dir: Path | None = None) -> Cell:
    """The cached, hash-checked contract code; raises ContractCodeError if not fetched."""
    path = (cache_dir or default_cache_dir()) / CODE_FILENAME
    try:
        boc = path.read_bytes()
    except FileNotFoundError as exc:
        raise ContractCodeError(
            f"no payment-channel code at {path}; run `python -m meshnode.pay.contract.code`"
        ) from exc
    try:
        code = Cell.one_from_boc(boc)
    except Exception as exc:
        raise ContractCodeError(f"{path} is not a BOC: {exc}") from exc
    return _checked(code, str(path))


def code_from_tonweb_source(source: str) -> Cell:
    match = _HEX_RE.search(source)
    if match is None:
        raise ContractCodeError("PAYMENT_CHANNEL_CODE_HEX not found in tonweb source")
    return _checked(Cell.one_from_boc(bytes.fromhex(match.group(1))), "tonweb")


def fetch_payment_channel_code(
    cache_dir: Path | None = None, package: str = TONWEB_PACKAGE
) -> Cell:
    """Download ``package`` with npm pack, extract and check the code, write the cache."""
    target = cache_dir or default_cache_dir()
    with tempfile.TemporaryDirectory(prefix="meshnode-tonweb-") as tmp:
        try:
            result = subprocess.run(
                ["npm", "pack", "--silent", "--ignore-scripts", package],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=NPM_PACK_TIMEOUT_S,
                check=False,
            )
        except FileNotFoundError as exc:
            raise ContractCodeError("npm is not installed; it is needed once to fetch") from exc
        except subprocess.TimeoutExpired as exc:
            raise ContractCodeError(f"npm pack {package} timed out") from exc
        if result.returncode != 0:
            raise ContractCodeError(f"npm pack {package} failed: {result.stderr.strip()}")
        tarball = Path(tmp) / result.stdout.strip().splitlines()[-1]
        with tarfile.open(tarball, "r:gz") as archive:
            member = archive.getmember(TONWEB_SOURCE_MEMBER)
            if not member.isfile() or member.size > MAX_SOURCE_BYTES:
                raise ContractCodeError(f"{TONWEB_SOURCE_MEMBER} in {package} looks wrong")
            extracted = archive.extractfile(member)
            if extracted is None:
                raise ContractCodeError(f"cannot read {TONWEB_SOURCE_MEMBER}")
            source = extracted.read().decode("utf-8")
    code = code_from_tonweb_source(source)
    target.mkdir(parents=True, exist_ok=True)
    staging = target / (CODE_FILENAME + ".tmp")
    staging.write_bytes(cell_to_boc(code))
    staging.replace(target / CODE_FILENAME)
    return code


def main() -> int:
    cache = default_cache_dir()
    try:
        load_payment_channel_code(cache)
        print(f"payment-channel code already cached at {cache / CODE_FILENAME}")
    except ContractCodeError:
        fetch_payment_channel_code(cache)
        print(f"payment-channel code fetched and verified into {cache / CODE_FILENAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
