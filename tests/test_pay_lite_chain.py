"""The real-network chain (``--chain liteclient``), checked without a network.

The wallet messages are checked by running the published wallet-v4r2 code in the TON
emulator (it must accept ours and emit exactly the intended internal message) and by
parsing them with pytoniq-core's TL-B decoders; addresses are cross-checked with
pytoniq's own wallet classes. The liteserver side is only exercised as far as loopback
allows: a listener that never answers the ADNL handshake.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytoniq.contract.wallets.wallet import WALLET_V4_R2_CODE, WalletV4
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.builder import Builder
from pytoniq_core.boc.cell import Cell
from pytoniq_core.boc.slice import Slice
from pytoniq_core.tlb.account import StateInit
from pytoniq_core.tlb.transaction import ExternalMsgInfo, InternalMsgInfo, MessageAny

from meshnode.core.voucher import VoucherSigner
from meshnode.pay.contract.cells import top_up_body
from meshnode.pay.setup.keys import PaymentKeys
from meshnode.pay.ton import lite_chain
from meshnode.pay.ton.chain_choice import ChainChoice, ChainKind, ChainUnavailable
from meshnode.pay.ton.emulator import ACTION_SEND_MSG, TvmLibrary
from meshnode.pay.ton.lite_chain import LiteChain, LiteChainError
from meshnode.pay.ton.wallet_v4 import (
    SUBWALLET_ID,
    TRANSFER_SEND_MODE,
    build_wallet_transfer,
    wallet_code,
    wallet_data,
    wallet_external_message,
    wallet_state_init,
    wallet_v4_address,
)

SEED = bytes(range(32))
PUBLIC = VoucherSigner(SEED).public_key
WALLET = wallet_v4_address(PUBLIC)
NOW = 1_700_000_000
VALID_UNTIL = NOW + 60
CHANNEL = Address((0, b"\x5a" * 32))
BALANCE = 5 * 10**9

# wallet-v4r2 recv_external's throw codes (wallet-code.fc).
EXIT_EXPIRED = 36
EXIT_BAD_SEQNO = 33
EXIT_BAD_SUBWALLET = 34
EXIT_BAD_SIGNATURE = 35


@pytest.fixture(scope="module")
def tvm() -> TvmLibrary:
    return TvmLibrary()


def parse(cell: Cell) -> Slice:
    cs: Slice = cell.begin_parse()  # type: ignore[no-untyped-call]
    return cs


def run_wallet(
    tvm: TvmLibrary, transfer: Cell, *, stored_seqno: int = 0, now: int = NOW
) -> dict[str, Any]:
    data = wallet_data(PUBLIC, SUBWALLET_ID, seqno=stored_seqno)
    return tvm.external_message(wallet_code(), data, WALLET, now, BALANCE, transfer)


def sent_messages(reply: dict[str, Any]) -> list[tuple[int, MessageAny]]:
    """(send mode, message) for each send_msg action, in the order they were made."""
    if not reply.get("actions"):
        return []
    node: Cell | None = Cell.one_from_boc(base64.b64decode(reply["actions"]))
    found: list[tuple[int, MessageAny]] = []
    while node is not None and node.refs:
        cs = parse(node)
        node = cs.load_ref()
        assert cs.load_uint(32) == ACTION_SEND_MSG
        mode = cs.load_uint(8)
        found.append((mode, MessageAny.deserialize(parse(cs.load_ref()))))
    return list(reversed(found))


def stored_seqno(reply: dict[str, Any]) -> int:
    data = Cell.one_from_boc(base64.b64decode(reply["new_data"]))
    return int(parse(data).load_uint(32))


def transfer(**changes: Any) -> Cell:
    args: dict[str, Any] = {
        "wallet_seed": SEED,
        "seqno": 0,
        "valid_until": VALID_UNTIL,
        "destination": CHANNEL,
        "value": 1_234_567_890,
        "body": top_up_body(1_000_000_000, 0),
        "state_init_cell": None,
        "subwallet_id": SUBWALLET_ID,
    }
    args.update(changes)
    return build_wallet_transfer(**args)


# --- addresses --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [SEED, b"\xff" * 32, bytes(32)])
def test_the_wallet_address_is_pytoniqs_wallet_v4r2_address_for_the_key(seed: bytes) -> None:
    public = VoucherSigner(seed).public_key
    data = WalletV4.create_data_cell(public, wallet_id=None, wc=0)
    theirs = Address((0, StateInit(code=WALLET_V4_R2_CODE, data=data).serialize().hash))
    assert wallet_v4_address(public) == theirs


def test_the_liteclient_choice_names_the_real_wallet_not_the_local_one(tmp_path: Path) -> None:
    keys = PaymentKeys.generate()
    choice = ChainChoice(ChainKind.LITECLIENT, write_config(tmp_path, 1))
    assert choice.wallet(keys) == wallet_v4_address(keys.wallet_public)
    assert ChainChoice(ChainKind.LOCAL).wallet(keys) != choice.wallet(keys)


# --- the wallet contract runs our messages ----------------------------------------------


def test_the_wallet_sends_exactly_the_requested_message(tvm: TvmLibrary) -> None:
    body = top_up_body(2_000_000_000, 0)
    reply = run_wallet(tvm, transfer(seqno=0, value=2_100_000_000, body=body))
    assert reply["vm_exit_code"] == 0
    [(mode, message)] = sent_messages(reply)
    assert mode == TRANSFER_SEND_MODE
    assert isinstance(message.info, InternalMsgInfo)
    assert message.info.dest == CHANNEL
    assert message.info.value.grams == 2_100_000_000
    assert message.info.bounce
    assert message.body.hash == body.hash
    assert message.init is None
    assert stored_seqno(reply) == 1


def test_a_deploying_message_carries_the_contracts_state_init(tvm: TvmLibrary) -> None:
    contract_init = wallet_state_init(VoucherSigner(b"\x09" * 32).public_key)
    reply = run_wallet(tvm, transfer(state_init_cell=contract_init))
    [(_, message)] = sent_messages(reply)
    assert message.init is not None
    assert message.init.serialize().hash == contract_init.hash


def test_the_wallet_accepts_the_next_seqno_with_a_real_deadline(tvm: TvmLibrary) -> None:
    reply = run_wallet(tvm, transfer(seqno=7), stored_seqno=7)
    assert reply["vm_exit_code"] == 0
    assert len(sent_messages(reply)) == 1
    assert stored_seqno(reply) == 8


@pytest.mark.parametrize(
    ("changes", "stored", "now", "exit_code"),
    [
        ({"wallet_seed": b"\x08" * 32}, 0, NOW, EXIT_BAD_SIGNATURE),
        ({"seqno": 4}, 5, NOW, EXIT_BAD_SEQNO),
        ({"seqno": 5}, 5, VALID_UNTIL, EXIT_EXPIRED),
        ({"subwallet_id": SUBWALLET_ID + 1}, 0, NOW, EXIT_BAD_SUBWALLET),
    ],
    ids=["bad-signature", "stale-seqno", "expired", "other-subwallet"],
)
def test_the_wallet_refuses_a_message_it_must_not_run(
    tvm: TvmLibrary, changes: dict[str, Any], stored: int, now: int, exit_code: int
) -> None:
    reply = run_wallet(tvm, transfer(**changes), stored_seqno=stored, now=now)
    assert reply["vm_exit_code"] == exit_code
    assert sent_messages(reply) == []


def test_a_transfer_field_that_does_not_fit_32_bits_is_refused() -> None:
    with pytest.raises(ValueError, match="valid_until"):
        transfer(valid_until=2**32)


# --- the envelope sent to the liteserver ------------------------------------------------


def test_the_first_send_deploys_the_wallet_in_the_external_message() -> None:
    body = transfer()
    message = MessageAny.deserialize(
        parse(wallet_external_message(WALLET, body, wallet_state_init(PUBLIC)))
    )
    assert isinstance(message.info, ExternalMsgInfo)
    assert message.info.dest == WALLET
    assert message.init is not None
    assert Address((0, message.init.serialize().hash)) == WALLET
    assert message.body.hash == body.hash


def test_later_sends_carry_no_state_init() -> None:
    message = MessageAny.deserialize(parse(wallet_external_message(WALLET, transfer())))
    assert message.init is None


# --- choosing and opening the chain -----------------------------------------------------


def write_config(tmp_path: Path, port: int) -> Path:
    """A global config of the published shape naming one liteserver on loopback."""
    ip = struct.unpack(">i", socket.inet_aton("127.0.0.1"))[0]
    key = base64.b64encode(VoucherSigner(b"\x03" * 32).public_key).decode()
    zero_hash = base64.b64encode(bytes(32)).decode()
    config = {
        "liteservers": [{"ip": ip, "port": port, "id": {"@type": "pub.ed25519", "key": key}}],
        "validator": {
            "init_block": {
                "workchain": -1,
                "shard": -(2**63),
                "seqno": 0,
                "root_hash": zero_hash,
                "file_hash": zero_hash,
            }
        },
    }
    path = tmp_path / "global.config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture
def silent_liteserver() -> Iterator[socket.socket]:
    """A loopback listener that accepts TCP but never speaks ADNL."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    yield listener
    listener.close()


def dialed(listener: socket.socket) -> bool:
    try:
        connection, _ = listener.accept()
    except BlockingIOError:
        return False
    connection.close()
    return True


def test_opening_the_liteclient_chain_does_not_dial(
    tmp_path: Path, silent_liteserver: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    config = write_config(tmp_path, silent_liteserver.getsockname()[1])
    keys = PaymentKeys.generate()
    with caplog.at_level(logging.WARNING):
        chain = ChainChoice(ChainKind.LITECLIENT, config).open(keys)
    assert isinstance(chain, LiteChain)
    assert chain.wallet == wallet_v4_address(keys.wallet_public)
    assert not dialed(silent_liteserver)
    assert "not been exercised against a live" in caplog.text


def test_the_first_call_dials_the_configured_liteserver_and_times_out(
    tmp_path: Path, silent_liteserver: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lite_chain, "CONNECT_TIMEOUT_S", 0.5)
    config = write_config(tmp_path, silent_liteserver.getsockname()[1])
    chain = LiteChain(config, SEED)
    try:
        with pytest.raises(LiteChainError, match="connect"):
            chain.balance(WALLET)
        assert dialed(silent_liteserver)
    finally:
        chain.close()


def test_a_send_from_another_wallet_is_refused_before_any_dial(
    tmp_path: Path, silent_liteserver: socket.socket
) -> None:
    chain = LiteChain(write_config(tmp_path, silent_liteserver.getsockname()[1]), SEED)
    with pytest.raises(LiteChainError, match="signs for wallet"):
        chain.send(CHANNEL, CHANNEL, 1, Builder().end_cell())
    assert not dialed(silent_liteserver)


def test_liteclient_needs_a_network_config() -> None:
    with pytest.raises(ChainUnavailable, match="--network-config"):
        ChainChoice(ChainKind.LITECLIENT).check()


def test_a_missing_network_config_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(ChainUnavailable, match=re.escape(str(missing))):
        ChainChoice(ChainKind.LITECLIENT, missing).check()


@pytest.mark.parametrize("text", ["not json{", "{}", '{"liteservers": []}', "[1, 2]"])
def test_a_network_config_that_is_not_a_global_config_is_named(tmp_path: Path, text: str) -> None:
    config = tmp_path / "bad.config.json"
    config.write_text(text)
    with pytest.raises(ChainUnavailable, match=re.escape(str(config))) as caught:
        ChainChoice(ChainKind.LITECLIENT, config).open(PaymentKeys.generate())
    assert "not a TON global config" in str(caught.value)
