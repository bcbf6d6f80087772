"""Shared set-up for the payment tests: one emulated chain running the real contract,
funded wallets for a client and a provider, and both sides' payment contexts."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libp2p.abc import IHost
from libp2p.peer.id import ID
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell

from meshnode.core.channel_auth import sign_job_auth
from meshnode.core.messages import Open
from meshnode.core.meter import Price
from meshnode.core.peerid import peer_id_from_ed25519
from meshnode.core.voucher import VoucherSigner
from meshnode.identity import NodeIdentity
from meshnode.jobs.payment_gate import PaymentGate
from meshnode.p2p.host import full_addrs, parse_peer_addr, running_host
from meshnode.pay.channel.lifecycle import ClientChannel, Payee
from meshnode.pay.contract.cells import ClosingConfig
from meshnode.pay.metering.gates import ChannelGates
from meshnode.pay.setup.wiring import ClientPayments, ProviderPayments
from meshnode.pay.ton.chain import SendResult
from meshnode.pay.ton.emulator import EmulatedChain

TON = 10**9
DEPOSIT = 2 * TON
START = 1_700_000_000
QUARANTINE_S = 3600
CONDITIONAL_CLOSE_S = 60
FINE = TON // 100
CLOSING = ClosingConfig(QUARANTINE_S, FINE, CONDITIONAL_CLOSE_S)
PRICE = Price(prompt_per_1k=1_000_000, completion_per_1k=3_000_000)
"""1000 nanoton per prompt token, 3000 per completion token."""
WINDOW_TOKENS = 4
"""Small enough that a 24-token job is asked to pay several times."""

CLIENT_WALLET = Address((0, bytes([0xC1]) * 32))
PROVIDER_WALLET = Address((0, bytes([0xB0]) * 32))
PROVIDER_PEER_ID = peer_id_from_ed25519(bytes([0xB0]) * 32)
"""The provider's peer id when a test drives its gate without a network."""


class CountingChain:
    """The emulated chain, counting the messages sent through it (a spy, not a fake)."""

    def __init__(self, chain: EmulatedChain) -> None:
        self.inner = chain
        self.sends = 0

    def now(self) -> int:
        return self.inner.now()

    def balance(self, address: Address) -> int:
        return self.inner.balance(address)

    def send(
        self,
        sender: Address,
        destination: Address,
        value: int,
        body: Cell,
        state_init: Cell | None = None,
    ) -> SendResult:
        self.sends += 1
        return self.inner.send(sender, destination, value, body, state_init)

    def get_int(self, address: Address, method: str) -> int:
        return self.inner.get_int(address, method)

    def get_stack(self, address: Address, method: str) -> list[Any]:
        return self.inner.get_stack(address, method)


@dataclass
class PayNet:
    chain: CountingChain
    client: ClientPayments
    provider: ProviderPayments

    @property
    def payee(self) -> Payee:
        return Payee(self.provider.keys.channel_public, PROVIDER_WALLET)

    async def open_channel(self, deposit: int = DEPOSIT) -> ClientChannel:
        return await ClientChannel.open(
            self.chain,
            CLIENT_WALLET,
            self.client.keys.channel_signer(),
            self.payee,
            deposit,
            code=self.client.code,
            ledger=self.client.ledger,
            book=self.client.book,
            closing=CLOSING,
        )


def pay_net(tmp: Path, code: Cell, *, window: int = WINDOW_TOKENS) -> PayNet:
    emulated = EmulatedChain(start_time=START)
    emulated.add_wallet(CLIENT_WALLET, 100 * TON)
    emulated.add_wallet(PROVIDER_WALLET, TON)
    chain = CountingChain(emulated)
    return PayNet(
        chain=chain,
        client=ClientPayments.at(tmp / "client", chain, CLIENT_WALLET, code),
        provider=ProviderPayments.at(tmp / "provider", chain, PROVIDER_WALLET, PRICE, window, code),
    )


def job_open(
    channel_id: int | None,
    job_id: bytes | None = None,
    *,
    signer: VoucherSigner | None = None,
    provider_peer_id: str = PROVIDER_PEER_ID,
    key: bytes | None = None,
) -> Open:
    """An Open as a client would send it (for driving the gate without a network),
    with the channel proof when given the channel's client key."""
    job_id = job_id or os.urandom(16)
    client_pub = bytes(32)
    auth = None
    if signer is not None and channel_id is not None:
        auth = sign_job_auth(signer, job_id, client_pub, channel_id, provider_peer_id)
    return Open(
        job_id=job_id,
        model_id="00" * 32,
        params={},
        max_tokens=64,
        channel_id=channel_id,
        client_pub=client_pub,
        header=bytes(24),
        auth=auth,
        channel_key=key if key is not None else signer.public_key if signer else None,
    )


def channel_gate(gates: ChannelGates, channel: ClientChannel) -> PaymentGate:
    """The provider's gate for one job on ``channel``, opened by the channel's client."""
    return gates(job_open(channel.channel_id, signer=channel.signer), PROVIDER_PEER_ID)


@asynccontextmanager
async def linked(net: PayNet) -> AsyncIterator[tuple[IHost, ID]]:
    """A provider host serving /meshnode/channel/1 and a client host connected to it."""
    async with running_host(NodeIdentity.generate()) as provider_host:
        net.provider.service.install(provider_host)
        async with running_host(NodeIdentity.generate()) as client_host:
            info = parse_peer_addr(full_addrs(provider_host)[0])
            await client_host.connect(info)
            yield client_host, info.peer_id
