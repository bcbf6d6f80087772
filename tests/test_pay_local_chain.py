"""The local dev chain: the emulated TON chain (real contract code) kept in a state file
that several processes share. Separate ``LocalChain`` instances on one file stand in for
separate processes: they share nothing but the file."""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

import pytest
from pay_net import PRICE, WINDOW_TOKENS, channel_gate
from pytoniq_core.boc.cell import Cell

from meshnode.core.voucher import VoucherSigner
from meshnode.identity import NodeIdentity
from meshnode.p2p.host import full_addrs, parse_peer_addr, running_host
from meshnode.pay.channel.lifecycle import ClientChannel, Payee
from meshnode.pay.contract.cells import CHANNEL_STATE_OPEN, CHANNEL_STATE_UNINITED, FEE_RESERVE
from meshnode.pay.setup.wiring import ClientPayments, ProviderPayments, close_channel
from meshnode.pay.ton import local_chain
from meshnode.pay.ton.local_chain import LocalChain, LocalChainError, local_wallet_address

TON = 10**9
TOKENS_PER_VOUCHER = 3
ALICE = local_wallet_address(VoucherSigner(b"\x01" * 32).public_key)
BOB = local_wallet_address(VoucherSigner(b"\x02" * 32).public_key)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "chain" / "local-ton-chain.json"


def test_a_fresh_chain_has_no_money_and_creates_no_file_for_a_read(state: Path) -> None:
    assert LocalChain(state).balance(ALICE) == 0
    assert not state.exists()


def test_balances_persist_across_instances(state: Path) -> None:
    LocalChain(state).faucet(ALICE, 3 * TON)
    assert LocalChain(state).balance(ALICE) == 3 * TON


def test_two_instances_on_one_file_see_each_others_writes(state: Path) -> None:
    first, second = LocalChain(state), LocalChain(state)
    first.faucet(ALICE, TON)
    assert second.balance(ALICE) == TON
    second.faucet(ALICE, 2 * TON)
    second.faucet(BOB, 5)
    assert (first.balance(ALICE), first.balance(BOB)) == (3 * TON, 5)


def test_the_default_state_file_comes_from_the_environment(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(local_chain.STATE_ENV, str(state))
    LocalChain().faucet(ALICE, 7)
    assert LocalChain(state).balance(ALICE) == 7


def test_the_faucet_refuses_a_non_positive_amount(state: Path) -> None:
    with pytest.raises(ValueError, match="positive"):
        LocalChain(state).faucet(ALICE, 0)


def test_a_local_wallet_address_depends_only_on_the_wallet_key() -> None:
    key = VoucherSigner(b"\x03" * 32).public_key
    assert local_wallet_address(key) == local_wallet_address(bytes(key))
    assert local_wallet_address(key) != ALICE
    assert local_wallet_address(key).wc == 0


@pytest.mark.parametrize(
    "content",
    [
        b"\x00not json at all",
        b'{"format": "something-else", "now": 1, "accounts": {}}',
        b'{"format": "meshnode-local-ton-chain-v1", "now": 1, "accounts": '
        b'{"0:zz": {"balance": 1, "code": null, "data": null}}}',
        b'{"format": "meshnode-local-ton-chain-v1", "now": 1, "accounts": {"0:'
        + b"ab" * 32
        + b'": {"balance": 1, "code": "!!not base64!!", "data": null}}}',
    ],
    ids=["garbage", "wrong-format", "bad-address", "bad-boc"],
)
def test_a_corrupt_state_file_is_a_clear_error_and_is_left_alone(
    state: Path, content: bytes
) -> None:
    state.parent.mkdir(parents=True)
    state.write_bytes(content)
    chain = LocalChain(state)
    with pytest.raises(LocalChainError, match="corrupt") as caught:
        chain.faucet(ALICE, TON)
    assert str(state) in str(caught.value)
    assert state.read_bytes() == content


def test_chain_time_never_goes_backwards(state: Path) -> None:
    LocalChain(state).faucet(ALICE, TON)
    ahead = int(time.time()) + 3600  # as if a machine with a fast clock wrote last
    document = json.loads(state.read_text())
    document["now"] = ahead
    state.write_text(json.dumps(document))
    chain = LocalChain(state)
    chain.faucet(BOB, TON)
    assert chain.now() >= ahead
    assert json.loads(state.read_text())["now"] >= ahead


def test_chain_time_follows_the_wall_clock(state: Path) -> None:
    before = int(time.time())
    chain = LocalChain(state)
    chain.faucet(ALICE, TON)
    assert before <= chain.now() <= int(time.time())


def test_a_held_lock_times_out_with_an_error_naming_the_lock_file(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_chain, "LOCK_TIMEOUT_S", 0.2)
    chain = LocalChain(state)
    chain.faucet(ALICE, TON)
    fd = os.open(chain.lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process in the middle of an operation
        with pytest.raises(LocalChainError, match="stayed locked") as caught:
            LocalChain(state).balance(ALICE)
        assert str(chain.lock_path) in str(caught.value)
    finally:
        os.close(fd)
    assert LocalChain(state).balance(ALICE) == TON


async def test_the_real_contract_opens_and_closes_across_two_instances(
    tmp_path: Path, state: Path, code: Cell
) -> None:
    """Client and provider each hold their own LocalChain on one file, as two processes
    would: deploy + top-up + init by the client, learned by the provider from the chain,
    vouchers, then a cooperative close paying exactly the last voucher."""
    client_chain, provider_chain = LocalChain(state), LocalChain(state)
    client = ClientPayments.at(tmp_path / "client", client_chain, ALICE, code)
    provider = ProviderPayments.at(
        tmp_path / "provider", provider_chain, BOB, PRICE, WINDOW_TOKENS, code
    )
    deposit = TON // 10
    client_chain.faucet(ALICE, deposit + FEE_RESERVE)
    provider_chain.faucet(BOB, TON // 10)
    async with running_host(NodeIdentity.generate()) as provider_host:
        provider.service.install(provider_host)
        async with running_host(NodeIdentity.generate()) as client_host:
            info = parse_peer_addr(full_addrs(provider_host)[0])
            await client_host.connect(info)
            channel = await ClientChannel.open(
                client_chain, ALICE, client.keys.channel_signer(),
                Payee(provider.keys.channel_public, BOB), deposit,
                code=code, ledger=client.ledger, book=client.book,
            )
            await channel.announce(client_host, info.peer_id)
            assert (await channel.status()).state == CHANNEL_STATE_OPEN
            gate = channel_gate(provider.gates, channel)
            payer = channel.payer(PRICE, WINDOW_TOKENS)
            payer.begin("hi")
            await gate.admit()
            await gate.start(prompt_tokens=2)
            payer.accepted(2, gate.owed_before)
            for delivered in range(TOKENS_PER_VOUCHER, 4 * TOKENS_PER_VOUCHER + 1,
                                   TOKENS_PER_VOUCHER):
                voucher = await payer.voucher_for(gate.ask(delivered, delivered), delivered)
                await gate.accept_voucher(voucher, delivered)
            await gate.finish()
            await payer.finish(delivered, complete=True)
            last = payer.vouchers[-1]
            bob_before = LocalChain(state).balance(BOB)
            status = await close_channel(client, client_host, str(info.peer_id),
                                         channel.channel_id)
    observer = LocalChain(state)
    assert last.sent > 0
    assert status.state == CHANNEL_STATE_UNINITED
    assert observer.balance(BOB) - bob_before == last.sent
    assert observer.balance(ALICE) == deposit - last.sent + FEE_RESERVE
    assert observer.balance(channel.address) == 0
