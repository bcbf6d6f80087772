"""The real TON network as a ``Chain``: a pytoniq LiteClient and this node's v4r2 wallet.

Off by default: only ``--chain liteclient --network-config PATH`` builds one, and the
liteservers come from that file alone (never pytoniq's built-in mainnet/testnet config
downloads). NOT YET EXERCISED AGAINST A LIVE NETWORK: the wallet messages are checked
offline (the real wallet code in the TVM emulator accepts them and emits exactly the
intended message), the liteserver conversation is not.

Threads and event loops: the ``Chain`` protocol is synchronous and the trio shell calls
it from a worker thread, one call at a time (``meshnode.pay.ton.onchain.on_chain``).
pytoniq's client is asyncio and keeps per-connection background tasks (reader, pinger,
block updater) on the loop that connected it. So each ``LiteChain`` owns one asyncio
loop in a daemon helper thread: the connection is made lazily on the first call and
lives there; each protocol call submits a coroutine with ``run_coroutine_threadsafe``
and waits for it with a timeout (the coroutine is cancelled if the wait runs out).
``asyncio.run`` per call would redo the handshake and block sync every time and tear
the background tasks down mid-flight.

What ``send`` reports: the destination's transaction for the message our wallet sent
(its compute-phase exit code and gas), found by the wallet's source address and the
message's logical time. Messages that contract sends in turn are not traced
(``transfers`` stays empty); read the contract's state with a get-method instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell
from pytoniq_core.tlb.transaction import InternalMsgInfo

from meshnode.core.voucher import VoucherSigner, cell_to_boc
from meshnode.pay.ton.chain import Chain, SendResult
from meshnode.pay.ton.wallet_v4 import (
    SUBWALLET_ID,
    build_wallet_transfer,
    wallet_external_message,
    wallet_state_init,
    wallet_v4_address,
)

if TYPE_CHECKING:
    from pytoniq.liteclient.client import LiteClient

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_CONFIG_BYTES = 4 << 20
"""The public global configs are ~50 kB; a multi-megabyte file is not a TON config."""

TRUST_LEVEL = 1
"""pytoniq's proof checking: 1 verifies each account state's shard proof against the
masterchain block the server names. 0 would also chain key blocks from the config's
init block, a long sync at every start; 2 (pytoniq's default) checks nothing."""

CONNECT_TIMEOUT_S = 30.0
"""Handshake plus the first masterchain sync; a healthy liteserver needs a few seconds."""

QUERY_TIMEOUT_S = 20.0
"""One liteserver query (account state, get-method, transactions): normally < 1 s;
pytoniq's own per-query timeout (below) fires first, this bounds our wait as a whole."""

CLOSE_TIMEOUT_S = 5.0
"""pytoniq's close waits up to 1 s per background task (three of them) plus the socket."""

LITESERVER_TIMEOUT_S = 10
"""pytoniq's per-request timeout, passed to the client."""

MESSAGE_TTL_S = 60
"""valid_until = now + this: long enough for a few blocks (~5 s each) to include it,
short enough that a message that did not land is known dead soon after."""

SEQNO_POLL_S = 2.0
"""Between seqno reads while waiting for the wallet: under one block interval."""

ACCEPT_GRACE_S = 15.0
"""How long past valid_until we keep reading the seqno: the liteserver's view of the
chain can lag the block that accepted the message by a few blocks."""

DELIVERY_TIMEOUT_S = 90.0
"""From the wallet's transaction to the destination's: usually the next block or two
(same shard or a neighbour); a minute and a half means something is wrong."""

TX_SCAN = 16
"""Recent transactions read per account when looking for ours: one liteserver page;
this wallet sends one message at a time so ours is among the newest."""

SEND_TIMEOUT_S = MESSAGE_TTL_S + ACCEPT_GRACE_S + DELIVERY_TIMEOUT_S + 3 * QUERY_TIMEOUT_S
"""The whole of one ``send``, for the thread waiting on it."""

EXIT_CODE_NOT_RUN = -1
"""Reported when the destination's compute phase was skipped although we deployed code
(the StateInit did not take): the channel operation did not happen."""


class LiteChainError(RuntimeError):
    """The network config is unusable or the network did not do what was asked."""


def load_network_config(path: Path) -> dict[str, Any]:
    """A TON global config (liteservers plus the validator init block), checked enough
    that pytoniq will not fail on it later; every error names the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise LiteChainError(f"cannot read network config {path}: {exc.strerror}") from None
    try:
        if len(raw) > MAX_CONFIG_BYTES:
            raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
        config = json.loads(raw)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        servers = config.get("liteservers")
        if not isinstance(servers, list) or not servers:
            raise ValueError("no 'liteservers' list")
        for i, server in enumerate(servers):
            ok = (
                isinstance(server, dict)
                and isinstance(server.get("ip"), int)
                and isinstance(server.get("port"), int)
                and isinstance(server.get("id"), dict)
                and isinstance(server["id"].get("key"), str)
            )
            if not ok:
                raise ValueError(f"liteserver {i} lacks ip, port or id.key")
        validator = config.get("validator")
        init_block = validator.get("init_block") if isinstance(validator, dict) else None
        if not isinstance(init_block, dict) or not {"root_hash", "file_hash"} <= init_block.keys():
            raise ValueError("no validator.init_block")
    except (ValueError, UnicodeDecodeError) as exc:
        raise LiteChainError(
            f"network config {path} is not a TON global config ({exc}); use the file "
            "published for your network (e.g. global.config.json)"
        ) from None
    return config


class LiteChain:
    """A ``Chain`` on the real network through one liteserver; see the module docstring."""

    def __init__(
        self, network_config: Path, wallet_seed: bytes, *, liteserver_index: int = 0
    ) -> None:
        self.network_config = network_config
        self._config = load_network_config(network_config)
        if not 0 <= liteserver_index < len(self._config["liteservers"]):
            raise LiteChainError(f"{network_config} has no liteserver #{liteserver_index}")
        self._liteserver_index = liteserver_index
        self._seed = wallet_seed
        self.wallet_public = VoucherSigner(wallet_seed).public_key
        self.wallet = wallet_v4_address(self.wallet_public)
        self._client: LiteClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._last_now = 0

    def __repr__(self) -> str:
        return f"LiteChain({self.network_config}, wallet={friendly(self.wallet)})"

    # --- Chain protocol ---------------------------------------------------------------

    def now(self) -> int:
        # Validators keep block time within seconds of UTC and quarantines last minutes
        # to hours, so the wall clock (held monotonic) stands in for a liteserver round
        # trip on the caller's (event loop) thread.
        self._last_now = max(self._last_now, int(time.time()))
        return self._last_now

    def balance(self, address: Address) -> int:
        return self._run(lambda: self._balance(address), QUERY_TIMEOUT_S)

    def send(
        self,
        sender: Address,
        destination: Address,
        value: int,
        body: Cell,
        state_init: Cell | None = None,
    ) -> SendResult:
        if sender != self.wallet:
            raise LiteChainError(f"this chain signs for wallet {self.wallet}, not {sender}")
        return self._run(lambda: self._send(destination, value, body, state_init), SEND_TIMEOUT_S)

    def get_int(self, address: Address, method: str) -> int:
        values = self.get_stack(address, method)
        if not values or not isinstance(values[-1], int):
            raise LiteChainError(f"get-method {method} returned {values!r}, not an int")
        return int(values[-1])

    def get_stack(self, address: Address, method: str) -> list[Any]:
        return self._run(lambda: self._get_stack(address, method), QUERY_TIMEOUT_S)

    def close(self) -> None:
        """Disconnect and stop the helper thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._drop_client()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CLOSE_TIMEOUT_S)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None

    # --- the helper thread's loop -----------------------------------------------------

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="meshnode-liteclient", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _run(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float) -> T:
        """Run ``make()`` on the helper loop and wait at most ``timeout`` seconds."""
        future = asyncio.run_coroutine_threadsafe(make(), self._ensure_loop())
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            self._drop_client()
            raise LiteChainError(
                f"the TON network did not answer within {timeout:.0f} s "
                f"(liteserver #{self._liteserver_index} of {self.network_config})"
            ) from None
        except LiteChainError:
            raise
        except Exception as exc:
            # pytoniq raises its own errors (and plain ones) for dropped connections,
            # failed proofs and failed get-methods alike; reconnecting on the next call
            # is cheap next to a channel operation and never reuses a broken link.
            self._drop_client()
            raise LiteChainError(f"liteserver error: {type(exc).__name__}: {exc}") from exc

    def _drop_client(self) -> None:
        loop = self._loop
        if loop is None or self._client is None:
            return
        closing = asyncio.run_coroutine_threadsafe(self._close_client(), loop)
        try:
            closing.result(CLOSE_TIMEOUT_S)
        except Exception as exc:  # already failing: the caller hears the first error
            log.warning("could not close the liteclient: %r", exc)

    async def _connected(self) -> LiteClient:
        if self._client is None:
            from pytoniq.liteclient.client import LiteClient

            client = LiteClient.from_config(
                self._config,
                ls_i=self._liteserver_index,
                trust_level=TRUST_LEVEL,
                timeout=LITESERVER_TIMEOUT_S,
            )
            try:
                await _bounded(client.connect(), CONNECT_TIMEOUT_S, "connect")
            except BaseException:
                await client.close()  # the reader task a half-made connection started
                raise
            self._client = client
        return self._client

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # --- queries ----------------------------------------------------------------------

    async def _balance(self, address: Address) -> int:
        client = await self._connected()
        account = await _bounded(client.get_account_state(address), QUERY_TIMEOUT_S, "balance")
        return int(account.balance)

    async def _get_stack(self, address: Address, method: str) -> list[Any]:
        client = await self._connected()
        values = await _bounded(
            client.run_get_method(address, method, []), QUERY_TIMEOUT_S, f"get-method {method}"
        )
        return list(values)

    async def _seqno(self) -> int | None:
        """The wallet's seqno, or None while it is not deployed."""
        client = await self._connected()
        account = await _bounded(
            client.get_account_state(self.wallet), QUERY_TIMEOUT_S, "wallet state"
        )
        if account.state.type_ == "frozen":
            raise LiteChainError(f"wallet {friendly(self.wallet)} is frozen (unpaid storage)")
        if account.state.type_ != "active":
            return None
        values = await _bounded(
            client.run_get_method(self.wallet, "seqno", []), QUERY_TIMEOUT_S, "wallet seqno"
        )
        return int(values[0])

    async def _send(
        self, destination: Address, value: int, body: Cell, state_init: Cell | None
    ) -> SendResult:
        client = await self._connected()
        account = await _bounded(
            client.get_account_state(self.wallet), QUERY_TIMEOUT_S, "wallet state"
        )
        if account.balance < value:
            raise LiteChainError(
                f"wallet {friendly(self.wallet)} holds {account.balance} nanoton, "
                f"cannot send {value} (plus fees)"
            )
        seqno = await self._seqno()
        deploy = seqno is None
        valid_until = self.now() + MESSAGE_TTL_S
        transfer = build_wallet_transfer(
            self._seed,
            seqno or 0,
            valid_until,
            destination,
            value,
            body,
            state_init,
            SUBWALLET_ID,
        )
        message = wallet_external_message(
            self.wallet, transfer, wallet_state_init(self.wallet_public) if deploy else None
        )
        await _bounded(
            client.raw_send_message(cell_to_boc(message)), QUERY_TIMEOUT_S, "send message"
        )
        try:
            await self._wait_seqno_above(seqno, valid_until)
            created_lt = await self._sent_message_lt(transfer)
            return await self._destination_result(destination, created_lt, state_init is not None)
        except Exception as exc:
            # The message is out: retrying blindly could pay twice (a new seqno is a new
            # message), so say that the outcome is open.
            raise LiteChainError(
                f"sent wallet message seqno {seqno or 0} to {friendly(destination)}, but its "
                f"outcome is unknown ({exc}); check the wallet and the contract before "
                "retrying"
            ) from exc

    async def _wait_seqno_above(self, seqno: int | None, valid_until: int) -> None:
        deadline = valid_until + ACCEPT_GRACE_S
        while True:
            current = await self._seqno()
            if current is not None and current > (seqno or 0):
                return  # a first send used seqno 0 and leaves the new wallet at 1
            if time.time() > deadline:
                raise LiteChainError(
                    f"wallet {friendly(self.wallet)} did not accept the message before it "
                    f"expired (seqno still {seqno}); nothing was sent"
                )
            await asyncio.sleep(SEQNO_POLL_S)

    async def _sent_message_lt(self, transfer: Cell) -> int:
        """The logical time of the internal message the wallet sent for ``transfer``."""
        client = await self._connected()
        transactions = await _bounded(
            client.get_transactions(self.wallet, TX_SCAN), QUERY_TIMEOUT_S, "wallet history"
        )
        for tx in transactions:
            if tx.in_msg is None or not tx.in_msg.is_external():
                continue
            if bytes(tx.in_msg.body.hash) != bytes(transfer.hash):
                continue
            if not tx.out_msgs:
                raise LiteChainError(
                    "the wallet accepted the transfer but sent nothing (balance too low for "
                    "the value plus fees?)"
                )
            sent = tx.out_msgs[0].info
            if not isinstance(sent, InternalMsgInfo):
                raise LiteChainError("the wallet sent an external message, not ours")
            return int(sent.created_lt)
        raise LiteChainError(f"the wallet's transaction is not among its last {TX_SCAN}")

    async def _destination_result(
        self, destination: Address, created_lt: int, deployed: bool
    ) -> SendResult:
        client = await self._connected()
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while time.monotonic() < deadline:
            transactions = await _bounded(
                client.get_transactions(destination, TX_SCAN), QUERY_TIMEOUT_S, "history"
            )
            for tx in transactions:
                inbound = tx.in_msg.info if tx.in_msg is not None else None
                if not isinstance(inbound, InternalMsgInfo):
                    continue
                if inbound.src != self.wallet or inbound.created_lt != created_lt:
                    continue
                return _outcome(tx, deployed)
            await asyncio.sleep(SEQNO_POLL_S)
        raise LiteChainError(
            f"the message to {friendly(destination)} was sent but its transaction did not "
            f"appear within {DELIVERY_TIMEOUT_S:.0f} s; check the contract's state"
        )


def friendly(address: Address) -> str:
    """The user-friendly (base64, bounceable) form wallets and explorers show."""
    return str(address.to_str())  # type: ignore[no-untyped-call]


def _outcome(tx: Any, deployed: bool) -> SendResult:
    compute = tx.description.compute_ph
    if compute.type_ == "skipped":
        # A plain account receiving value runs no code (the emulator says 0 for that);
        # a skipped phase after we attached code means the deploy did not happen.
        return SendResult(EXIT_CODE_NOT_RUN if deployed else 0)
    exit_code = int(compute.exit_code)
    action = tx.description.action
    if exit_code in (0, 1) and action is not None and not action.success:
        exit_code = int(action.result_code) or EXIT_CODE_NOT_RUN
    return SendResult(exit_code, int(compute.gas_used or 0))


async def _bounded(step: Awaitable[T], timeout: float, what: str) -> T:
    try:
        return await asyncio.wait_for(step, timeout)
    except TimeoutError:
        raise LiteChainError(f"liteserver {what}: no answer within {timeout:.0f} s") from None


if TYPE_CHECKING:
    _conforms: type[Chain] = LiteChain
