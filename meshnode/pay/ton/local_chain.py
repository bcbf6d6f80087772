"""A local development TON chain that several processes share through one state file.

`meshnode serve` (the provider) and `meshnode channel ...`/`meshnode ask` (the client)
are separate processes, so the in-memory ``EmulatedChain`` alone cannot connect them.
``LocalChain`` keeps the chain's state (every account's balance, contract code and data
as base64 BOCs, and the chain time) in a JSON file. Each operation takes an exclusive
``flock`` on a sibling lock file, loads the state into an ``EmulatedChain`` (the real
contract code runs in the real TVM), does its work, and writes the state back
atomically if it changed. Nothing here talks to a network.

Wallets on this chain are plain accounts: ``local_wallet_address`` names one after the
hash of the wallet public key. That is a LOCAL-CHAIN address only, not the address of a
real wallet-v4 contract for that key: never send real TON to it.
"""

from __future__ import annotations

import base64
import binascii
import errno
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell

from meshnode.core.errors import EXIT_USAGE, MeshnodeError
from meshnode.core.voucher import cell_to_boc
from meshnode.pay.ton.chain import Chain, SendResult
from meshnode.pay.ton.emulator import Account, EmulatedChain, TvmLibrary

STATE_ENV = "MESHNODE_CHAIN_STATE"
STATE_FORMAT = "meshnode-local-ton-chain-v1"

LOCK_TIMEOUT_S = 10.0
"""One operation holds the lock for a few TVM runs (milliseconds); ten seconds of
waiting means a process is stuck holding it, which the caller should hear about."""

LOCK_POLL_S = 0.01
"""Retry interval while another process holds the lock: short next to an operation."""

MAX_STATE_BYTES = 64 << 20
"""A channel contract's state is well under a kilobyte; a state file this large is not
one we wrote, and reading it whole could exhaust memory."""

T = TypeVar("T")


class LocalChainError(MeshnodeError, RuntimeError):
    """The local chain's state file cannot be used; the message names the file."""

    exit_code = EXIT_USAGE
    label = "local chain"


def default_state_path() -> Path:
    """``$MESHNODE_CHAIN_STATE``, else one file per user shared by every data dir."""
    override = os.environ.get(STATE_ENV)
    if override:
        return Path(override)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "meshnode" / "local-ton-chain.json"


def local_wallet_address(wallet_public_key: bytes) -> Address:
    """The local chain's wallet account for a wallet key: ``0:`` + sha256(public key).

    Only meaningful on ``LocalChain``; a real wallet-v4 address also depends on the
    wallet contract's code and subwallet id."""
    return Address((0, hashlib.sha256(wallet_public_key).digest()))


def _raw(key: tuple[int, bytes]) -> str:
    return f"{key[0]}:{key[1].hex()}"


def _b64(cell: Cell | None) -> str | None:
    return None if cell is None else base64.b64encode(cell_to_boc(cell)).decode("ascii")


def _encode(accounts: dict[tuple[int, bytes], Account]) -> dict[str, Any]:
    return {
        _raw(key): {"balance": a.balance, "code": _b64(a.code), "data": _b64(a.data)}
        for key, a in sorted(accounts.items())
    }


def _decode_cell(value: object) -> Cell | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("code/data must be base64 strings")
    return Cell.one_from_boc(base64.b64decode(value, validate=True))


def _decode_account(raw_address: str, value: object) -> tuple[tuple[int, bytes], Account]:
    wc, _, account = raw_address.partition(":")
    key = (int(wc), bytes.fromhex(account))
    if len(key[1]) != 32:
        raise ValueError(f"account {raw_address!r} is not a 32-byte raw address")
    if not isinstance(value, dict):
        raise ValueError(f"account {raw_address} is not an object")
    balance = value.get("balance")
    if not isinstance(balance, int) or isinstance(balance, bool) or balance < 0:
        raise ValueError(f"account {raw_address} has a bad balance")
    return key, Account(balance, _decode_cell(value.get("code")), _decode_cell(value.get("data")))


class LocalChain:
    """A ``Chain`` over a shared state file; see the module docstring."""

    def __init__(self, path: Path | None = None, library: TvmLibrary | None = None) -> None:
        self.path = path or default_state_path()
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._library = library or TvmLibrary()
        self._last_now = 0

    # --- Chain protocol ---------------------------------------------------------------

    def now(self) -> int:
        # The stored time is only ever the wall clock of a past operation, so the wall
        # clock (held monotonic by the last time this instance saw) is the chain's time
        # without a file read on the caller's (event loop) thread.
        self._last_now = max(self._last_now, int(time.time()))
        return self._last_now

    def balance(self, address: Address) -> int:
        return self._apply(lambda chain: chain.balance(address))

    def send(
        self,
        sender: Address,
        destination: Address,
        value: int,
        body: Cell,
        state_init: Cell | None = None,
    ) -> SendResult:
        return self._apply(lambda chain: chain.send(sender, destination, value, body, state_init))

    def get_int(self, address: Address, method: str) -> int:
        return self._apply(lambda chain: chain.get_int(address, method))

    def get_stack(self, address: Address, method: str) -> list[Any]:
        return self._apply(lambda chain: chain.get_stack(address, method))

    # --- local dev chain only ---------------------------------------------------------

    def faucet(self, address: Address, amount: int) -> int:
        """Mint ``amount`` nanoton into ``address``; its balance afterwards."""
        if amount <= 0:
            raise ValueError("the faucet amount must be positive")

        def mint(chain: EmulatedChain) -> int:
            chain.add_wallet(address, amount)
            return chain.balance(address)

        return self._apply(mint)

    # --- state file -------------------------------------------------------------------

    def _apply(self, operation: Callable[[EmulatedChain], T]) -> T:
        with self._locked():
            stored_now, accounts = self._load()
            now = max(stored_now, self.now())
            self._last_now = now
            chain = EmulatedChain(start_time=now, library=self._library)
            # The emulator's own account table: the state file is exactly that table.
            chain.restore(accounts)
            before = _encode(accounts)
            result = operation(chain)
            after = _encode(chain.accounts)
            if after != before:
                self._save(now, after)
            return result

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise LocalChainError(
                            f"{self.lock_path} stayed locked for {LOCK_TIMEOUT_S:.0f} s: "
                            "another process is stuck in a local-chain operation"
                        ) from None
                    time.sleep(LOCK_POLL_S)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def _load(self) -> tuple[int, dict[tuple[int, bytes], Account]]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            return 0, {}  # a fresh local chain
        try:
            if len(raw) > MAX_STATE_BYTES:
                raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
            state = json.loads(raw)
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise ValueError(f"not a {STATE_FORMAT} document")
            now = state.get("now")
            accounts = state.get("accounts")
            if not isinstance(now, int) or not isinstance(accounts, dict):
                raise ValueError("'now' or 'accounts' missing")
            return now, dict(_decode_account(k, v) for k, v in accounts.items())
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            raise LocalChainError(
                f"local chain state {self.path} is corrupt ({exc}); it was left as it is. "
                f"Move it away to start a fresh local chain (all its balances and "
                f"channels are lost), or point ${STATE_ENV} at another file."
            ) from None

    def _save(self, now: int, accounts: dict[str, Any]) -> None:
        document = json.dumps({"format": STATE_FORMAT, "now": now, "accounts": accounts})
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(document)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # public balances; mkstemp makes it 0600
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


if TYPE_CHECKING:
    _conforms: type[Chain] = LocalChain
