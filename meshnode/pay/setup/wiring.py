"""Entry points for the CLI and the demo: open, inspect and close channels; set up a
provider's payment side. Each role keeps its ledger and channel files in its own
folder under the data dir, so one home can serve and ask at once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell
from trio_typing import TaskStatus

from meshnode.core.advert import Advert, TonPayee
from meshnode.core.meter import Price
from meshnode.pay.channel.book import ChannelBook
from meshnode.pay.channel.ledger import Ledger
from meshnode.pay.channel.lifecycle import (
    DEFAULT_CLOSING,
    ChannelError,
    ChannelStatus,
    ChannelWatcher,
    ClientChannel,
    Payee,
)
from meshnode.pay.channel.service import ChannelService
from meshnode.pay.contract.cells import ClosingConfig
from meshnode.pay.contract.code import load_payment_channel_code
from meshnode.pay.metering.gates import ChannelGates
from meshnode.pay.setup.keys import PaymentKeys, load_or_create_payment_keys
from meshnode.pay.ton.chain import Chain
from meshnode.pay.ton.onchain import raw_address

CLIENT_DIR = "pay-client"
PROVIDER_DIR = "pay-provider"


@dataclass
class ClientPayments:
    """A client's payment context: chain, wallet, keys and its ledger/channel files."""

    chain: Chain
    wallet: Address
    keys: PaymentKeys
    ledger: Ledger
    book: ChannelBook
    code: Cell

    @classmethod
    def at(
        cls, home: Path, chain: Chain, wallet: Address, code: Cell | None = None
    ) -> ClientPayments:
        code = code or load_payment_channel_code()
        keys, _ = load_or_create_payment_keys(home)
        folder = home / CLIENT_DIR
        return cls(chain, wallet, keys, Ledger(folder), ChannelBook(folder, code), code)

    async def channel(self, channel_id: int) -> ClientChannel:
        return await ClientChannel.load(
            self.chain,
            self.wallet,
            self.keys.channel_signer(),
            channel_id,
            ledger=self.ledger,
            book=self.book,
        )


def payee_of(advert: Advert) -> Payee:
    if advert.ton is None:
        raise ChannelError("no_payee", f"provider {advert.peer_id} advertises no TON wallet")
    return Payee(advert.ton.channel_pubkey, Address(advert.ton.wallet_address))


def price_of(advert: Advert, model: str | None = None) -> Price:
    offer = advert.offer_for(model) if model else advert.models[0]
    if offer is None:
        raise LookupError(f"provider {advert.peer_id} does not serve {model!r}")
    return Price(offer.price_prompt_per_1k, offer.price_completion_per_1k)


async def open_channel(
    payments: ClientPayments,
    host: IHost,
    advert: Advert,
    deposit: int,
    *,
    closing: ClosingConfig = DEFAULT_CLOSING,
) -> ClientChannel:
    """Deploy + deposit + init a channel to the advert's provider, then announce it."""
    channel = await ClientChannel.open(
        payments.chain,
        payments.wallet,
        payments.keys.channel_signer(),
        payee_of(advert),
        deposit,
        code=payments.code,
        ledger=payments.ledger,
        book=payments.book,
        closing=closing,
    )
    await channel.announce(host, ID.from_base58(advert.peer_id))
    return channel


async def channel_status(payments: ClientPayments, channel_id: int) -> ChannelStatus:
    return await (await payments.channel(channel_id)).status()


async def close_channel(
    payments: ClientPayments, host: IHost, provider_peer_id: str, channel_id: int
) -> ChannelStatus:
    """Cooperative close paying exactly the latest voucher; the status after it."""
    channel = await payments.channel(channel_id)
    await channel.close(host, ID.from_base58(provider_peer_id))
    return await channel.status()


@dataclass
class ProviderPayments:
    """A provider's payment side, as one service of the node: the gate factory for its
    jobs, the `/meshnode/channel/1` handler (``install``) and the chain watcher
    (``run``). ``provider_node(engine, payments=...)`` attaches all of it and
    advertises ``payee``.
    """

    gates: ChannelGates
    service: ChannelService
    watcher: ChannelWatcher
    keys: PaymentKeys
    ledger: Ledger

    @property
    def payee(self) -> TonPayee:
        """What the advert carries: channel key, wallet and credit window."""
        return TonPayee(self.keys.channel_public, raw_address(self.service.wallet),
                        self.gates.credit_window_tokens)

    def install(self, host: IHost) -> None:
        self.service.install(host)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.watcher.run(task_status=task_status)

    @classmethod
    def at(
        cls,
        home: Path,
        chain: Chain,
        wallet: Address,
        price: Price,
        credit_window_tokens: int,
        code: Cell | None = None,
    ) -> ProviderPayments:
        code = code or load_payment_channel_code()
        keys, _ = load_or_create_payment_keys(home)
        folder = home / PROVIDER_DIR
        ledger = Ledger(folder)
        book = ChannelBook(folder, code)
        signer = keys.channel_signer()
        gates = ChannelGates(ledger, price, credit_window_tokens)
        return cls(
            gates=gates,
            service=ChannelService(chain, code, signer, wallet, ledger, book, busy=gates.busy),
            watcher=ChannelWatcher(chain, signer, wallet, ledger, book),
            keys=keys,
            ledger=ledger,
        )
