"""An in-process TON chain for tests: plain wallets plus contracts run in the real TVM.

Contracts execute in the TON emulator library (``libemulator``) bundled in the PyPI
package ``pytvm``. We load that shared object directly with our own ctypes declarations
because pytvm's wrapper declares ``balance``/``amount`` as 32-bit C ints (anything above
~4.29 TON wraps), leaves the gas limit at the value-derived default (a zero-value
message then gets no gas), and its convenience calls fail to parse the reply when the
contract throws.

What is modelled: balances, deployment by StateInit, the compute phase of every
internal message, and outgoing value transfers (send modes 0/1/2/64/128, bounce of the
inbound value when the contract throws). What is not: fees, storage rent, shards,
logical time. That is enough to check that the payment-channel contract pays exactly
what the signed states say; fees are measured on the real network, not here.
"""

from __future__ import annotations

import base64
import ctypes
import importlib.util
import json
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytoniq_core.boc.address import Address
from pytoniq_core.boc.builder import Builder
from pytoniq_core.boc.cell import Cell
from pytoniq_core.boc.slice import Slice
from pytoniq_core.crypto.crc import crc16
from pytoniq_core.tlb.vm_stack import VmStack

from meshnode.core.errors import MeshnodeError
from meshnode.core.voucher import cell_to_boc
from meshnode.pay.ton.chain import Chain, SendResult, Transfer

EMULATOR_LIB_ENV = "MESHNODE_TVM_EMULATOR_LIB"

GAS_LIMIT = 1_000_000
"""The basechain's per-transaction gas cap; set explicitly so zero-value messages
(signed channel operations carry no value) still get gas."""

MAX_MESSAGE_HOPS = 64
"""Bound on a message cascade, so a contract that pings itself cannot hang a test."""

ACTION_SEND_MSG = 0x0EC3C86D
ACTION_RESERVE = 0x36E6B809
SEND_MODE_IGNORE_ERRORS = 2
SEND_MODE_CARRY_INBOUND = 64
SEND_MODE_CARRY_ALL = 128

EXIT_CODE_NO_GAS_OR_ERROR = -14
"""What we report when the emulator itself returns no exit code (a library error)."""

_RAND_SEED_HEX = b"00" * 32
_EMPTY = Builder().end_cell()


class EmulatorError(MeshnodeError, RuntimeError):
    """The emulated chain cannot do what was asked (unknown account, no funds, ...)."""

    label = "the chain refused"


def _find_library() -> Path:
    override = os.environ.get(EMULATOR_LIB_ENV)
    if override:
        return Path(override)
    spec = importlib.util.find_spec("pytvm")
    if spec is None or not spec.submodule_search_locations:
        raise EmulatorError("pytvm is not installed (it ships the TON emulator library)")
    engine_dir = Path(next(iter(spec.submodule_search_locations))) / "engine"
    candidates = sorted(engine_dir.glob("libemulator*"))
    if not candidates:
        raise EmulatorError(f"no libemulator in {engine_dir}")
    return candidates[0]


def _default_config_boc() -> bytes:
    """A basechain config (the emulator's c7 wants one); pytvm ships a small one."""
    from pytvm.utils import DEFAULT_CONFIG_BOC  # type: ignore[import-untyped]

    return str(DEFAULT_CONFIG_BOC).encode()


class TvmLibrary:
    """ctypes view of the emulator's C API with correct 64-bit integer types."""

    def __init__(self, path: Path | None = None) -> None:
        lib = ctypes.CDLL(str(path or _find_library()))
        lib.emulator_set_verbosity_level.restype = ctypes.c_bool
        lib.emulator_set_verbosity_level.argtypes = [ctypes.c_int]
        lib.tvm_emulator_create.restype = ctypes.c_void_p
        lib.tvm_emulator_create.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int]
        lib.tvm_emulator_set_c7.restype = ctypes.c_bool
        lib.tvm_emulator_set_c7.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_uint32,
            ctypes.c_uint64,
            ctypes.c_char_p,
            ctypes.c_char_p,
        ]
        lib.tvm_emulator_set_gas_limit.restype = ctypes.c_bool
        lib.tvm_emulator_set_gas_limit.argtypes = [ctypes.c_void_p, ctypes.c_int64]
        # Replies are C strings the library never lets us free (it exports no
        # string_destroy); each is a few kB and tests send dozens, so we accept the leak.
        lib.tvm_emulator_send_internal_message.restype = ctypes.c_char_p
        lib.tvm_emulator_send_internal_message.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_uint64,
        ]
        lib.tvm_emulator_send_external_message.restype = ctypes.c_char_p
        lib.tvm_emulator_send_external_message.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.tvm_emulator_run_get_method.restype = ctypes.c_char_p
        lib.tvm_emulator_run_get_method.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
        lib.tvm_emulator_destroy.restype = None
        lib.tvm_emulator_destroy.argtypes = [ctypes.c_void_p]
        lib.emulator_set_verbosity_level(0)
        self._lib = lib
        self._config = _default_config_boc()

    def _reply(self, raw: bytes | None) -> dict[str, Any]:
        if not raw:
            raise EmulatorError("emulator returned no reply")
        reply: dict[str, Any] = json.loads(raw)
        return reply

    def _vm(self, code: Cell, data: Cell, address: Address, now: int, balance: int) -> int:
        vm: int | None = self._lib.tvm_emulator_create(_b64(code), _b64(data), 0)
        if not vm:
            raise EmulatorError("could not create a TVM emulator (bad code or data BOC?)")
        raw_address = f"{address.wc}:{address.hash_part.hex()}".encode()
        if not self._lib.tvm_emulator_set_c7(
            vm, raw_address, now, balance, _RAND_SEED_HEX, self._config
        ):
            self._lib.tvm_emulator_destroy(vm)
            raise EmulatorError("could not set c7")
        return vm

    def internal_message(
        self,
        code: Cell,
        data: Cell,
        address: Address,
        now: int,
        balance: int,
        body: Cell,
        value: int,
    ) -> dict[str, Any]:
        vm = self._vm(code, data, address, now, balance)
        try:
            self._lib.tvm_emulator_set_gas_limit(vm, GAS_LIMIT)
            return self._reply(self._lib.tvm_emulator_send_internal_message(vm, _b64(body), value))
        finally:
            self._lib.tvm_emulator_destroy(vm)

    def external_message(
        self, code: Cell, data: Cell, address: Address, now: int, balance: int, body: Cell
    ) -> dict[str, Any]:
        """Run the contract's ``recv_external`` on ``body`` (e.g. a wallet's signed
        transfer); the reply's ``accepted`` says whether it paid for its own gas."""
        vm = self._vm(code, data, address, now, balance)
        try:
            self._lib.tvm_emulator_set_gas_limit(vm, GAS_LIMIT)
            return self._reply(self._lib.tvm_emulator_send_external_message(vm, _b64(body)))
        finally:
            self._lib.tvm_emulator_destroy(vm)

    def get_method(
        self, code: Cell, data: Cell, address: Address, now: int, balance: int, method: str
    ) -> dict[str, Any]:
        vm = self._vm(code, data, address, now, balance)
        try:
            stack = Builder()
            stack.store_uint(0, 24)  # empty VmStack
            return self._reply(
                self._lib.tvm_emulator_run_get_method(vm, method_id(method), _b64(stack.end_cell()))
            )
        finally:
            self._lib.tvm_emulator_destroy(vm)


def _b64(cell: Cell) -> bytes:
    return base64.b64encode(cell_to_boc(cell))


def _cell(b64: str) -> Cell:
    return Cell.one_from_boc(base64.b64decode(b64))


def method_id(name: str) -> int:
    return (int.from_bytes(crc16(name.encode()), "big") & 0xFFFF) | 0x10000


def _key(address: Address) -> tuple[int, bytes]:
    return (address.wc, bytes(address.hash_part))


def _slice(cell: Cell) -> Slice:
    return Slice(cell.bits.copy(), list(cell.refs), cell.type_)


@dataclass
class Account:
    balance: int = 0
    code: Cell | None = None
    data: Cell | None = None


@dataclass(frozen=True, slots=True)
class _Message:
    source: Address
    destination: Address
    value: int
    body: Cell
    state_init: Cell | None = None
    bounce: bool = True


@dataclass
class EmulatedChain:
    """A ``Chain`` whose contracts run in the real TVM; see the module docstring."""

    start_time: int
    library: TvmLibrary = field(default_factory=TvmLibrary)
    _now: int = 0
    _accounts: dict[tuple[int, bytes], Account] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._now = self.start_time

    # --- Chain protocol ---------------------------------------------------------------

    def now(self) -> int:
        return self._now

    def balance(self, address: Address) -> int:
        account = self._accounts.get(_key(address))
        return account.balance if account else 0

    def send(
        self,
        sender: Address,
        destination: Address,
        value: int,
        body: Cell,
        state_init: Cell | None = None,
    ) -> SendResult:
        wallet = self._accounts.get(_key(sender))
        if wallet is None or wallet.balance < value:
            raise EmulatorError(f"wallet {sender} cannot pay {value} nanoton")
        wallet.balance -= value
        return self._deliver(_Message(sender, destination, value, body, state_init))

    def get_int(self, address: Address, method: str) -> int:
        values = self.get_stack(address, method)
        if not values or not isinstance(values[-1], int):
            raise EmulatorError(f"get-method {method} returned {values!r}, not an int")
        return int(values[-1])

    def get_stack(self, address: Address, method: str) -> list[Any]:
        account = self._accounts.get(_key(address))
        if account is None or account.code is None or account.data is None:
            raise EmulatorError(f"{address} has no contract")
        reply = self.library.get_method(
            account.code, account.data, address, self._now, account.balance, method
        )
        if reply.get("vm_exit_code") not in (0, 1):
            raise EmulatorError(f"get-method {method} failed: {reply}")
        values = VmStack.deserialize(_slice(_cell(reply["stack"])))  # type: ignore[no-untyped-call]
        return list(values)

    # --- test controls ----------------------------------------------------------------

    def add_wallet(self, address: Address, balance: int) -> None:
        self._accounts.setdefault(_key(address), Account()).balance += balance

    @property
    def accounts(self) -> dict[tuple[int, bytes], Account]:
        """Every account, keyed by (workchain, hash): the whole chain state, for
        persisting it (meshnode.pay.ton.local_chain)."""
        return self._accounts

    def restore(self, accounts: dict[tuple[int, bytes], Account]) -> None:
        self._accounts = accounts

    def advance(self, seconds: int) -> None:
        self._now += seconds

    def contract_data(self, address: Address) -> Cell | None:
        account = self._accounts.get(_key(address))
        return account.data if account else None

    # --- message processing -----------------------------------------------------------

    def _deliver(self, first: _Message) -> SendResult:
        queue: deque[_Message] = deque([first])
        result: SendResult | None = None
        transfers: list[Transfer] = []
        for _ in range(MAX_MESSAGE_HOPS):
            if not queue:
                break
            message = queue.popleft()
            outcome, emitted = self._execute(message)
            if result is None:
                result = outcome
            for out in emitted:
                transfers.append(Transfer(out.source, out.destination, out.value, out.body))
                queue.append(out)
        else:
            raise EmulatorError(f"message cascade longer than {MAX_MESSAGE_HOPS} hops")
        assert result is not None
        return SendResult(result.exit_code, result.gas_used, tuple(transfers))

    def _execute(self, message: _Message) -> tuple[SendResult, list[_Message]]:
        account = self._accounts.setdefault(_key(message.destination), Account())
        if account.code is None and message.state_init is not None:
            self._deploy(account, message.destination, message.state_init)
        account.balance += message.value
        if account.code is None or account.data is None:
            return SendResult(exit_code=0), []  # a plain wallet just receives
        reply = self.library.internal_message(
            account.code,
            account.data,
            message.destination,
            self._now,
            account.balance,
            message.body,
            message.value,
        )
        exit_code = int(reply.get("vm_exit_code", EXIT_CODE_NO_GAS_OR_ERROR))
        gas_used = int(reply.get("gas_used", 0))
        if not reply.get("success") or exit_code not in (0, 1):
            return SendResult(exit_code, gas_used), self._bounce(account, message)
        actions = _cell(reply["actions"]) if reply.get("actions") else None
        new_data = _cell(reply["new_data"])
        emitted = self._apply_actions(account, message, actions)
        account.data = new_data
        return SendResult(exit_code, gas_used), emitted

    def _bounce(self, account: Account, message: _Message) -> list[_Message]:
        if not message.bounce or message.value == 0:
            return []
        account.balance -= message.value
        bounced = _Message(message.destination, message.source, message.value, _EMPTY, bounce=False)
        return [bounced]

    def _deploy(self, account: Account, address: Address, state_init: Cell) -> None:
        if bytes(state_init.hash) != address.hash_part:
            raise EmulatorError("state_init does not match the destination address")
        if state_init.bits.to01() != "00110" or len(state_init.refs) != 2:
            raise EmulatorError("only StateInit with code and data is supported")
        account.code, account.data = state_init.refs[0], state_init.refs[1]

    def _apply_actions(
        self, account: Account, inbound: _Message, actions: Cell | None
    ) -> list[_Message]:
        ordered: list[Slice] = []
        node = actions
        while node is not None and node.refs:
            cs = _slice(node)
            node = cs.load_ref()
            ordered.append(cs)
        ordered.reverse()  # the list is built newest-first
        emitted: list[_Message] = []
        for cs in ordered:
            tag = cs.load_uint(32)
            if tag != ACTION_SEND_MSG:
                raise EmulatorError(f"unsupported out action {tag:#x}")
            mode = cs.load_uint(8)
            emitted.extend(self._send_action(account, inbound, mode, cs.load_ref()))
        return emitted

    def _send_action(
        self, account: Account, inbound: _Message, mode: int, message: Cell
    ) -> list[_Message]:
        cs = _slice(message)
        if cs.load_bit():
            raise EmulatorError("contracts may only send internal messages here")
        cs.load_bit()  # ihr_disabled
        bounce = bool(cs.load_bit())
        cs.load_bit()  # bounced
        cs.load_address()  # src: the chain fills it in
        destination = cs.load_address()
        value = cs.load_coins() or 0
        if mode & SEND_MODE_CARRY_ALL:
            value = account.balance
        elif mode & SEND_MODE_CARRY_INBOUND:
            value += inbound.value
        if value > account.balance:
            if mode & SEND_MODE_IGNORE_ERRORS:
                return []
            raise EmulatorError(f"contract tried to send {value} with {account.balance}")
        account.balance -= value
        if not isinstance(destination, Address):
            raise EmulatorError("contract sent to a non-internal address")
        body = message.refs[-1] if message.refs else _EMPTY
        return [_Message(inbound.destination, destination, value, body, bounce=bounce)]


if TYPE_CHECKING:
    _conforms: type[Chain] = EmulatedChain
