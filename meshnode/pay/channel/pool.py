"""The light client's channels to priced providers, managed within a budget.

Routed jobs (``ask --model``, ``client --api``, ``ClientNode.complete``) pay through
this. The first job on a priced provider opens a channel to it (deploy + deposit + init,
then announce); later jobs, and later runs of the client, reuse it: channels live in the
client's channel book and ledger under the data dir (key files mode 0600). A channel
that cannot carry the next job (its unspent deposit below the job's most expensive
outcome plus the provider's credit window) is closed cooperatively and replaced; the
contract takes no top-up after init, so replacing is the only top-up there is. A channel
unused for ``idle_close_s`` is closed. Providers the client cannot afford are skipped by
the router (``affordable``), never tried and refused.

Budget: ``deposit`` per channel and ``total`` over the client's lifetime in this data
dir: deposits of open channels plus what closed channels paid may not exceed it, so the
client never spends more than ``total`` whatever providers do.

One job at a time per channel (vouchers are cumulative): concurrent jobs to one
provider wait for each other here, as they would at the provider.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from pytoniq_core.boc.address import Address
from trio_typing import TaskStatus

from meshnode.core.advert import Advert
from meshnode.core.meter import Price
from meshnode.jobs.payment_gate import Payer, PaymentUnavailable
from meshnode.pay.channel.lifecycle import ChannelError, ClientChannel
from meshnode.pay.contract.cells import (
    CHANNEL_STATE_OPEN,
    CHANNEL_STATE_UNINITED,
    FEE_RESERVE,
)
from meshnode.pay.metering.payer import DEFAULT_CLIENT_WINDOW_TOKENS, prompt_token_bound
from meshnode.pay.setup.wiring import ClientPayments, open_channel
from meshnode.pay.ton.local_chain import LocalChain
from meshnode.pay.ton.onchain import ChannelReadError, on_chain, raw_address

log = logging.getLogger(__name__)

NANO_PER_TON = 10**9
DEFAULT_DEPOSIT = NANO_PER_TON // 10
"""0.1 TON per provider: thousands of jobs at typical prices, little locked if a
provider disappears (the rest comes back with an uncooperative close)."""
DEFAULT_TOTAL_BUDGET = NANO_PER_TON
"""1 TON over the data dir's lifetime: ten providers' worth before the user raises it."""
DEFAULT_IDLE_CLOSE_S = 24 * 3600.0
"""A day: a client used daily keeps its channels (each open and close costs gas), one
that stopped frees its deposits."""
IDLE_CHECK_S = 60.0
"""How often idle channels are looked for; far below any useful idle time."""
DEFAULT_PROVIDER_WINDOW_TOKENS = 32
"""The credit window assumed for a provider whose advert does not state one (the
default of `meshnode serve`)."""

ChannelKey = tuple[bytes, str]
"""A provider's payee: its channel key and raw wallet address."""


@dataclass(frozen=True)
class Budget:
    deposit: int = DEFAULT_DEPOSIT
    total: int = DEFAULT_TOTAL_BUDGET
    idle_close_s: float = DEFAULT_IDLE_CLOSE_S

    def __post_init__(self) -> None:
        if self.deposit <= 0 or self.total < self.deposit:
            raise ValueError("the deposit must be positive and the total at least one deposit")
        if self.idle_close_s <= 0:
            raise ValueError("the idle time before closing must be positive")


def _payee(advert: Advert) -> ChannelKey | None:
    if advert.ton is None:
        return None
    try:
        return advert.ton.channel_pubkey, raw_address(Address(advert.ton.wallet_address))
    except Exception:  # pytoniq raises several types for a bad address
        return None


def _price(advert: Advert, model_id: str) -> Price | None:
    offer = advert.offer_for(model_id)
    return None if offer is None else Price(offer.price_prompt_per_1k,
                                            offer.price_completion_per_1k)


def job_need(advert: Advert, price: Price, prompt: str, max_tokens: int) -> int:
    """Unspent deposit a channel needs for this job: its dearest outcome (the prompt's
    token bound, every token asked for) plus the provider's credit window."""
    window = (advert.ton.credit_window_tokens if advert.ton else 0) or (
        DEFAULT_PROVIDER_WINDOW_TOKENS
    )
    return price.cost(prompt_token_bound(prompt), max_tokens) + price.window_cost(window)


class ClientChannels:
    """`JobPayments` over TON channels opened on demand (module docstring)."""

    def __init__(
        self,
        payments: ClientPayments,
        budget: Budget | None = None,
        *,
        credit_window_tokens: int = DEFAULT_CLIENT_WINDOW_TOKENS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.payments = payments
        self.budget = budget or Budget()
        self.credit_window_tokens = credit_window_tokens
        self.clock = clock
        self._open: dict[ChannelKey, ClientChannel] = {}
        self._stray: list[ClientChannel] = []
        """Open channels to a provider that has a newer one: closed by close_all."""
        self._closed_paid = 0
        self._last_used: dict[int, float] = {}
        self._job_locks: dict[int, trio.Lock] = {}
        self._payee_locks: dict[ChannelKey, trio.Lock] = {}
        self._host: IHost | None = None
        self._dial: Callable[[Advert], Awaitable[None]] | None = None
        self._lookup: Callable[[str | None, bytes | None], Advert | None] = (
            lambda _peer, _key: None
        )
        self.loaded = False
        self.opened = 0
        self.closed = 0

    # --- wiring -----------------------------------------------------------------------

    def attach(
        self,
        host: IHost,
        dial: Callable[[Advert], Awaitable[None]],
        lookup: Callable[[str | None, bytes | None], Advert | None],
    ) -> None:
        """The node's host, its dialer and its directory (to reach a provider to close:
        by the peer id on file, else by the channel key it advertises)."""
        self._host, self._dial, self._lookup = host, dial, lookup

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the channels on file, then close idle ones now and then."""
        await self.load()
        task_status.started()
        while True:
            await trio.sleep(IDLE_CHECK_S)
            try:
                await self.close_idle()
            except Exception:  # one unreachable provider must not stop the others
                log.exception("closing idle channels failed; trying again later")

    async def load(self) -> None:
        """Every channel in the book: open ones (checked on chain) are reused, closed
        ones count what they paid against the budget."""
        p = self.payments
        signer = p.keys.channel_signer()
        for entry in await trio.to_thread.run_sync(p.book.all):
            channel = await ClientChannel.from_entry(
                p.chain, p.wallet, signer, entry, ledger=p.ledger, book=p.book
            )
            try:
                view = await channel.view()
            except ChannelReadError:
                log.warning("channel %#x is not on chain (an open that never happened)",
                            channel.channel_id)
                continue
            paid = channel.latest.sent if channel.latest else 0
            if view.state == CHANNEL_STATE_OPEN:
                key = (entry.config.key_b, raw_address(entry.config.address_b))
                older = self._open.get(key)
                if older is not None:  # two open to one provider (a crash mid-rotation)
                    log.warning("two open channels to one provider: %#x and %#x; the first "
                                "is closed with the others", older.channel_id, channel.channel_id)
                    self._stray.append(older)
                self._open[key] = channel
                stored = await trio.to_thread.run_sync(p.ledger.latest_voucher, channel.ref)
                self._last_used[channel.channel_id] = (
                    stored.accepted_at if stored is not None else self.clock()
                )
            elif view.state == CHANNEL_STATE_UNINITED and view.balance_a == 0:
                self._closed_paid += paid
            else:  # closing unilaterally: its deposit is still committed
                self._closed_paid += channel.deposit
        self.loaded = True

    # --- budget -----------------------------------------------------------------------

    @property
    def committed(self) -> int:
        """Deposits of open channels plus what closed channels paid (nanoton)."""
        return sum(c.deposit for c in [*self._open.values(), *self._stray]) + self._closed_paid

    @property
    def channels(self) -> list[ClientChannel]:
        return list(self._open.values())

    def _opening_fits(self, replacing: ClientChannel | None) -> bool:
        committed = self.committed
        if replacing is not None:  # closing it gives back what it did not pay
            committed -= replacing.unspent
        return committed + self.budget.deposit <= self.budget.total

    def affordable(self, advert: Advert, model_id: str, prompt: str, max_tokens: int) -> bool:
        price = _price(advert, model_id)
        if price is None or price.prompt_per_1k == price.completion_per_1k == 0:
            return True  # free: nothing to pay
        key = _payee(advert)
        if key is None:
            return False
        need = job_need(advert, price, prompt, max_tokens)
        channel = self._open.get(key)
        if channel is not None and channel.unspent >= need:
            return True
        return self.budget.deposit >= need and self._opening_fits(channel)

    # --- one job ----------------------------------------------------------------------

    @asynccontextmanager
    async def job(
        self, advert: Advert, model_id: str, prompt: str, max_tokens: int
    ) -> AsyncIterator[Payer | None]:
        price = _price(advert, model_id)
        if price is None or price.prompt_per_1k == price.completion_per_1k == 0:
            yield None
            return
        channel = await self._channel_for(advert, price, prompt, max_tokens)
        lock = self._job_locks.setdefault(channel.channel_id, trio.Lock())
        async with lock:
            self._last_used[channel.channel_id] = self.clock()
            try:
                yield channel.payer(price, self.credit_window_tokens)
            finally:
                self._last_used[channel.channel_id] = self.clock()

    async def _channel_for(
        self, advert: Advert, price: Price, prompt: str, max_tokens: int
    ) -> ClientChannel:
        key = _payee(advert)
        if key is None:
            raise PaymentUnavailable("no_payee", f"{advert.peer_id} advertises no TON wallet")
        need = job_need(advert, price, prompt, max_tokens)
        async with self._payee_locks.setdefault(key, trio.Lock()):
            channel = self._open.get(key)
            if channel is not None and channel.unspent < need:
                if not self._opening_fits(channel) or self.budget.deposit < need:
                    raise PaymentUnavailable(
                        "over_budget", "the channel is spent and a new one would exceed the "
                        "budget (raise --budget)")
                await self._close(channel, advert)
                channel = None
            if channel is None:
                if self.budget.deposit < need:
                    raise PaymentUnavailable(
                        "deposit_too_small",
                        f"one job here may cost {need} nanoton, more than the deposit "
                        f"{self.budget.deposit} (raise --deposit)",
                    )
                if not self._opening_fits(None):
                    raise PaymentUnavailable(
                        "over_budget",
                        f"{self.committed} of {self.budget.total} nanoton committed",
                    )
                channel = await self._open_to(advert, key)
            elif channel.entry.counter_state is None:  # announce failed earlier: again
                await self._announce(channel, advert)
            return channel

    async def _open_to(self, advert: Advert, key: ChannelKey) -> ClientChannel:
        if self._host is None:
            raise PaymentUnavailable("not_attached", "the client's channels have no host")
        p = self.payments
        if isinstance(p.chain, LocalChain):  # the development chain has a faucet
            await fund_local_wallet(p.chain, p.wallet, self.budget.deposit + FEE_RESERVE)
        try:
            channel = await open_channel(p, self._host, advert, self.budget.deposit)
        except ChannelError as exc:
            raise PaymentUnavailable(exc.code, str(exc)) from exc
        except Exception as exc:  # the chain (emulator, liteserver) refused or failed
            raise PaymentUnavailable("chain", f"{type(exc).__name__}: {exc}") from exc
        self._open[key] = channel
        self.opened += 1
        log.info("opened channel %#x to %s with %d nanoton", channel.channel_id,
                 advert.peer_id, channel.deposit)
        return channel

    async def _announce(self, channel: ClientChannel, advert: Advert) -> None:
        assert self._host is not None
        try:
            await channel.announce(self._host, ID.from_base58(advert.peer_id))
        except (ChannelError, trio.TooSlowError, OSError) as exc:
            raise PaymentUnavailable("announce", str(exc)) from exc

    # --- closing ----------------------------------------------------------------------

    async def _close(self, channel: ClientChannel, advert: Advert | None) -> None:
        """Close cooperatively (waits for a job running on it); pays any debt."""
        if self._host is None:
            raise PaymentUnavailable("not_attached", "the client's channels have no host")
        async with self._job_locks.setdefault(channel.channel_id, trio.Lock()):
            peer = advert.peer_id if advert is not None else channel.entry.peer_id
            if peer is None:
                raise ChannelError("no_peer", f"no provider on file for {channel.channel_id:#x}")
            if advert is not None and self._dial is not None:
                await self._dial(advert)
            await channel.close(self._host, ID.from_base58(peer))
            key = (channel.entry.config.key_b, raw_address(channel.entry.config.address_b))
            if self._open.get(key) is channel:
                del self._open[key]
            if channel in self._stray:
                self._stray.remove(channel)
            self._closed_paid += channel.latest.sent if channel.latest else 0
            self._last_used.pop(channel.channel_id, None)
            self.closed += 1
            log.info("closed channel %#x (paid %d)", channel.channel_id,
                     channel.latest.sent if channel.latest else 0)

    async def close_idle(self, now: float | None = None) -> list[int]:
        """Close the channels unused for ``idle_close_s``; their ids."""
        now = self.clock() if now is None else now
        done = []
        for channel in [*self._open.values(), *self._stray]:
            last = self._last_used.get(channel.channel_id, now)
            if now - last < self.budget.idle_close_s:
                continue
            advert = self._lookup(channel.entry.peer_id, channel.entry.config.key_b)
            try:
                await self._close(channel, advert)
            except (ChannelError, PaymentUnavailable, OSError, trio.TooSlowError) as exc:
                log.warning("could not close idle channel %#x: %s", channel.channel_id, exc)
                continue
            done.append(channel.channel_id)
        return done

    async def close_all(self) -> list[int]:
        """Close every open channel cooperatively (the providers must be reachable)."""
        return await self.close_idle(now=float("inf"))


async def fund_local_wallet(chain: LocalChain, wallet: Address, needed: int) -> int:
    """Top ``wallet`` up to ``needed`` from the local chain's faucet; what was minted."""
    held = await on_chain(chain.balance, wallet)
    if held >= needed:
        return 0
    await on_chain(chain.faucet, wallet, needed - held)
    return needed - held
