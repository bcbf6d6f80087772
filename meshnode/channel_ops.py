"""What `meshnode channel open|status|close`, `serve --chain` and `ask --channel` do.

The CLI prints; this module does the work and returns what there is to print. Each
command runs in its own process, so the chain they share is ``LocalChain`` (a state
file), and a node's keys, ledger and channel book stay in its data dir. Key material is
never returned or printed here: only public keys and addresses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

import trio
from pytoniq_core.boc.address import Address

from meshnode.core.advert import Advert, TonPayee
from meshnode.core.errors import MeshnodeError
from meshnode.core.meter import Price
from meshnode.node import ClientNode, client_node
from meshnode.pay.channel.book import ChannelBook
from meshnode.pay.channel.ledger import Ledger
from meshnode.pay.channel.lifecycle import (
    ChannelError,
    ChannelStatus,
    ChannelWatcher,
    ClientChannel,
)
from meshnode.pay.channel.pool import Budget, ClientChannels
from meshnode.pay.contract.cells import (
    CHANNEL_STATE_AWAITING_FINALIZATION,
    CHANNEL_STATE_CLOSURE_STARTED,
    CHANNEL_STATE_OPEN,
    CHANNEL_STATE_SETTLING_CONDITIONALS,
    CHANNEL_STATE_UNINITED,
    FEE_RESERVE,
)
from meshnode.pay.contract.code import load_payment_channel_code
from meshnode.pay.metering.payer import ChannelPayer
from meshnode.pay.setup.keys import load_or_create_payment_keys
from meshnode.pay.setup.wiring import (
    PROVIDER_DIR,
    ClientPayments,
    ProviderPayments,
    close_channel,
    open_channel,
    payee_of,
    price_of,
)
from meshnode.pay.ton.chain import Chain
from meshnode.pay.ton.chain_choice import ChainChoice
from meshnode.pay.ton.local_chain import LocalChain
from meshnode.pay.ton.onchain import ChannelReadError, on_chain, raw_address, read_channel

NANO_PER_TON = 10**9
TON_DECIMALS = 9

MAX_CHANNEL_ID = (1 << 128) - 1
"""The contract stores channel ids in 128 bits."""

DEFAULT_CREDIT_WINDOW_TOKENS = 32
"""Tokens a provider produces ahead of payment: the client pays every few chunks, and
a client that stops paying costs the provider at most this many tokens."""

PROVIDER_GAS_FLOOR = NANO_PER_TON // 10
"""On the local chain a provider's wallet must exist to send the watcher's challenge or
finish messages; below 0.1 TON the faucet tops it up to that."""

STATE_NAMES = {
    CHANNEL_STATE_UNINITED: "closed",
    CHANNEL_STATE_OPEN: "open",
    CHANNEL_STATE_CLOSURE_STARTED: "closing (quarantine)",
    CHANNEL_STATE_SETTLING_CONDITIONALS: "closing (settling conditionals)",
    CHANNEL_STATE_AWAITING_FINALIZATION: "closing (awaiting finish)",
}


class ChannelCommandError(MeshnodeError):
    """A channel command cannot go on; ``exit_code`` is what the CLI exits with."""

    label = "channel"

    def __init__(self, msg: str, exit_code: int = 1) -> None:
        super().__init__(msg)
        self.exit_code = exit_code


EXIT_UNREACHABLE = 3  # the same exit codes as `meshnode ask`
EXIT_NOT_VERIFIED = 5


def parse_ton(text: str) -> int:
    """``"0.1"`` → 100_000_000 nanoton; positive, at most nine decimals."""
    try:
        amount = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"{text!r} is not an amount of TON") from None
    if not amount.is_finite() or amount <= 0:
        raise ValueError(f"{text!r}: the amount must be a positive number of TON")
    nano = amount * NANO_PER_TON
    if nano != nano.to_integral_value():
        raise ValueError(f"{text!r}: TON has {TON_DECIMALS} decimals")
    return int(nano)


def format_ton(nano: int) -> str:
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_TON)
    return f"{sign}{whole}.{frac:0{TON_DECIMALS}d} TON"


def parse_channel_id(text: str) -> int:
    """A channel id as printed (``0x…``) or in decimal."""
    try:
        value = int(text.strip(), 0)
    except ValueError:
        raise ValueError(f"{text!r} is not a channel id (0x… or decimal)") from None
    if not 0 < value <= MAX_CHANNEL_ID:
        raise ValueError(f"channel id {text} is out of range")
    return value


def state_name(state: int) -> str:
    return STATE_NAMES.get(state, f"unknown ({state})")


async def _fund_from_faucet(chain: Chain, wallet: Address, needed: int) -> int:
    """Top ``wallet`` up to ``needed`` on the local chain; what the faucet minted."""
    if not isinstance(chain, LocalChain):
        return 0  # a real chain has no faucet: the operator funds the wallet
    held = await on_chain(chain.balance, wallet)
    if held >= needed:
        return 0
    await on_chain(chain.faucet, wallet, needed - held)
    return needed - held


async def _connect(client: ClientNode, peer: str) -> Advert:
    try:
        return await client.connect(peer)
    except Exception as exc:  # libp2p raises its own dial errors
        raise ChannelCommandError(
            f"cannot reach {peer}: {type(exc).__name__}: {exc}", EXIT_UNREACHABLE
        ) from None


# --- client side ---------------------------------------------------------------------


def client_payments(home: Path, choice: ChainChoice) -> ClientPayments:
    keys, _ = load_or_create_payment_keys(home)
    return ClientPayments.at(home, choice.open(keys), choice.wallet(keys))


@dataclass(frozen=True)
class OpenedChannel:
    channel_id: int
    address: Address
    deposit: int
    wallet: Address
    provider_peer_id: str
    provider_wallet: Address
    funded: int
    """Nanoton the local-chain faucet minted into the client's wallet first (0: none)."""


async def open_paid_channel(
    home: Path, choice: ChainChoice, peer: str, deposit: int, *, insecure: bool
) -> OpenedChannel:
    """Connect to ``peer``, read its advert and TON payee, fund, open and announce."""
    payments = client_payments(home, choice)
    await on_chain(payments.chain.balance, payments.wallet)  # an unusable chain fails first
    async with client_node(allow_insecure=insecure) as client:
        advert = await _connect(client, peer)
        listing = client.directory.get(advert.peer_id, time.time())
        if listing is None or not listing.verified:
            raise ChannelCommandError(
                f"provider {advert.peer_id} is not verified "
                f"({client.verification(advert.peer_id)}); --insecure allows dev providers",
                EXIT_NOT_VERIFIED,
            )
        payee = payee_of(advert)
        funded = await _fund_from_faucet(payments.chain, payments.wallet, deposit + FEE_RESERVE)
        channel = await open_channel(payments, client.host, advert, deposit)
    return OpenedChannel(
        channel_id=channel.channel_id,
        address=channel.address,
        deposit=channel.deposit,
        wallet=payments.wallet,
        provider_peer_id=advert.peer_id,
        provider_wallet=payee.wallet,
        funded=funded,
    )


async def read_status(home: Path, choice: ChainChoice, channel_id: int) -> ChannelStatus:
    channel = await client_payments(home, choice).channel(channel_id)
    return await channel.status()


@dataclass(frozen=True)
class ClosedChannel:
    status: ChannelStatus
    paid_seqno: int
    paid_to_provider: int
    """What the closing voucher says the provider earned (the contract paid exactly it)."""
    refunded: int
    """What went back to the client's wallet (rest of the deposit plus the fee reserve)."""
    provider_wallet: Address


async def close_paid_channel(
    home: Path, choice: ChainChoice, channel_id: int, peer: str
) -> ClosedChannel:
    """Cooperative close with the provider at ``peer``, paying exactly the last voucher."""
    payments = client_payments(home, choice)
    channel = await payments.channel(channel_id)
    view = await channel.view()
    if view.state != CHANNEL_STATE_OPEN:
        raise ChannelCommandError(
            f"channel {channel_id:#x} is {state_name(view.state)} on chain: nothing to close"
        )
    provider_wallet = channel.entry.config.address_b
    wallet_before = await on_chain(payments.chain.balance, payments.wallet)
    async with client_node() as client:
        advert = await _connect(client, peer)
        _check_payee(channel, advert)
        status = await close_channel(payments, client.host, advert.peer_id, channel_id)
    wallet_after = await on_chain(payments.chain.balance, payments.wallet)
    latest = await trio.to_thread.run_sync(payments.ledger.latest_voucher, channel.ref)
    return ClosedChannel(
        status=status,
        paid_seqno=latest.voucher.seqno if latest else 0,
        paid_to_provider=latest.voucher.sent if latest else 0,
        refunded=wallet_after - wallet_before,
        provider_wallet=provider_wallet,
    )


def _check_payee(channel: ClientChannel, advert: Advert) -> None:
    config = channel.entry.config
    payee = payee_of(advert)
    if payee.channel_public_key != config.key_b or raw_address(payee.wallet) != raw_address(
        config.address_b
    ):
        raise ChannelCommandError(
            f"channel {channel.channel_id:#x} pays another provider than {advert.peer_id}"
        )


async def channel_payer(
    payments: ClientPayments, channel_id: int, advert: Advert, model: str | None = None
) -> ChannelPayer:
    """A payer for one job at ``advert``'s price, over a channel to that provider."""
    channel = await payments.channel(channel_id)
    _check_payee(channel, advert)
    return channel.payer(price_of(advert, model))


# --- provider side -------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderPaymentSetup:
    payments: ProviderPayments
    payee: TonPayee
    """What the advert carries: the channel public key and the wallet address."""
    funded: int
    """Nanoton the local-chain faucet minted into the provider's wallet (0: none)."""


async def provider_payments(
    home: Path, choice: ChainChoice, price: Price, credit_window_tokens: int
) -> ProviderPaymentSetup:
    keys, _ = load_or_create_payment_keys(home)
    chain = choice.open(keys)
    wallet = choice.wallet(keys)
    funded = await _fund_from_faucet(chain, wallet, PROVIDER_GAS_FLOOR)
    payments = ProviderPayments.at(home, chain, wallet, price, credit_window_tokens)
    payee = TonPayee(keys.channel_public, raw_address(wallet), credit_window_tokens)
    return ProviderPaymentSetup(payments, payee, funded)


# --- routed payments (ask --model, client --api) ----------------------------------------


def routed_payments(home: Path, choice: ChainChoice, budget: Budget) -> ClientChannels:
    """The channels a light client pays routed jobs with (opened on demand)."""
    return ClientChannels(client_payments(home, choice), budget)


@dataclass(frozen=True)
class ChannelRow:
    """One line of `channel list` (client) or `earnings` (provider)."""

    channel_id: int
    address: str
    counterparty: str
    """The provider's peer id (client side) or the client's key (provider side)."""
    state: str
    deposit: int
    paid: int
    """The latest voucher: what a close pays to the provider."""
    owed: int
    """What the recorded jobs cost: above ``paid`` by the unpaid debt."""
    jobs: int
    completion_tokens: int

    @property
    def debt(self) -> int:
        return max(0, self.owed - self.paid)


async def _chain_state(chain: Chain, address: Address) -> str:
    try:
        view = await on_chain(read_channel, chain, address)
    except ChannelReadError:
        return "not on chain"
    if view.state == CHANNEL_STATE_UNINITED and view.balance_a == 0:
        return "closed"
    return state_name(view.state)


async def list_channels(home: Path, choice: ChainChoice) -> list[ChannelRow]:
    """Every channel this node opened as a client, with its state on chain."""
    payments = client_payments(home, choice)
    signer = payments.keys.channel_signer()
    rows = []
    for entry in await trio.to_thread.run_sync(payments.book.all):
        channel = await ClientChannel.from_entry(
            payments.chain, payments.wallet, signer, entry,
            ledger=payments.ledger, book=payments.book,
        )
        jobs = await trio.to_thread.run_sync(payments.ledger.jobs, channel.ref)
        rows.append(ChannelRow(
            channel_id=channel.channel_id,
            address=raw_address(channel.address),
            counterparty=entry.peer_id or "?",
            state=await _chain_state(payments.chain, channel.address),
            deposit=channel.deposit,
            paid=channel.latest.sent if channel.latest else 0,
            owed=channel.owed,
            jobs=len(jobs),
            completion_tokens=sum(j.completion_tokens for j in jobs),
        ))
    return rows


async def close_all_channels(
    home: Path, choice: ChainChoice, bootstrap: list[str], peers: list[str], *, insecure: bool
) -> tuple[list[int], list[int]]:
    """Close every open channel cooperatively: (closed ids, ids left open). Providers
    are found through the mesh (``bootstrap``) or dialed at ``peers``."""
    channels = routed_payments(home, choice, Budget())
    async with client_node(allow_insecure=insecure, bootstrap=bootstrap,
                           payments=channels) as client:
        for addr in peers:
            await _connect(client, addr)
        await client.verify_pending()
        closed = await channels.close_all()
        left = [c.channel_id for c in channels.channels]
    return closed, left


# --- provider earnings --------------------------------------------------------------


async def withdraw(home: Path, choice: ChainChoice, channel_id: int) -> tuple[int | None, bool]:
    """Provider side, for a client that stays away: start closing ``channel_id`` on chain
    with its latest voucher if it is still open *on chain* (a close this provider
    co-signed may never have been sent), and finish every close whose quarantine and
    settling time are over (what a running `serve` does by itself).
    (what the started close will pay, or None if it was already closing; whether this
    channel's close was finished now)."""
    keys, _ = load_or_create_payment_keys(home)
    chain = choice.open(keys)
    ledger = Ledger(home / PROVIDER_DIR)
    book = ChannelBook(home / PROVIDER_DIR, load_payment_channel_code())
    watcher = ChannelWatcher(chain, keys.channel_signer(), choice.wallet(keys), ledger, book)
    try:
        records = [r for r in await trio.to_thread.run_sync(ledger.channels)
                   if r.channel_id == channel_id]
        if not records:
            raise ChannelError("unknown_channel", f"no channel {channel_id:#x} to this provider")
        if len(records) > 1:  # ids are chosen by clients and may repeat
            raise ChannelError("ambiguous", f"{len(records)} clients use id {channel_id:#x}")
        [record] = records
        entry = next((e for e in await trio.to_thread.run_sync(book.all)
                      if e.config.channel_id == channel_id
                      and e.config.key_a == record.client_key), None)
        if entry is None:
            raise ChannelError("unknown_channel", f"channel {channel_id:#x} has no book entry")
        view = await on_chain(read_channel, chain, entry.address)
        is_open = view.state == CHANNEL_STATE_OPEN
        started = await watcher.start_close(record.ref) if is_open else None
        finished = await watcher.check_once()
        return started, any(a.channel_id == channel_id and a.action == "finished"
                            for a in finished)
    finally:
        ledger.close()


async def earnings(home: Path, choice: ChainChoice) -> list[ChannelRow]:
    """Per channel clients opened to this provider: deposit, what the latest voucher
    pays, tokens served and unpaid debt, with the channel's state on chain."""
    keys, _ = load_or_create_payment_keys(home)
    chain = choice.open(keys)
    ledger = Ledger(home / PROVIDER_DIR)
    book = ChannelBook(home / PROVIDER_DIR, load_payment_channel_code())
    entries = {
        (e.config.channel_id, e.config.key_a): e
        for e in await trio.to_thread.run_sync(book.all)
    }
    rows = []
    for record in await trio.to_thread.run_sync(ledger.channels):
        latest = await trio.to_thread.run_sync(ledger.latest_voucher, record.ref)
        jobs = await trio.to_thread.run_sync(ledger.jobs, record.ref)
        entry = entries.get((record.channel_id, record.client_key))
        state = record.state
        if entry is not None:
            state = await _chain_state(chain, entry.address)
        rows.append(ChannelRow(
            channel_id=record.channel_id,
            address=record.address or (raw_address(entry.address) if entry else "?"),
            counterparty=record.client_key.hex(),
            state=state,
            deposit=record.deposit,
            paid=latest.voucher.sent if latest else 0,
            owed=sum(j.cost for j in jobs),
            jobs=len(jobs),
            completion_tokens=sum(j.completion_tokens for j in jobs),
        ))
    ledger.close()
    return rows
