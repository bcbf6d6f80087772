"""Payment-channel lifecycle from the client's side, plus the provider's chain watcher.

A channel costs two on-chain messages whatever it carries: one that deploys the contract
with the deposit and inits it (the contract counts the message's value towards the
balances init sets), and one close. Everything between is off-chain vouchers. The client is
party A and must send init itself (whoever signs init sets the balances). After opening,
the client announces the channel to the provider on `/meshnode/channel/1`; the provider
checks it on chain and hands back its signed zero state, which the client keeps so it
can close unilaterally if the provider disappears.

Close: cooperatively (the provider co-signs a split paying exactly the last voucher), or
unilaterally with the latest voucher, a quarantine in which the other side may answer
with a newer state, then finish. `ChannelWatcher` is the provider's side of that: it
challenges a stale state the client submitted, and finishes closes whose time is up.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell
from trio_typing import TaskStatus

from meshnode.core.errors import MeshnodeError
from meshnode.core.meter import Price
from meshnode.core.voucher import Voucher, VoucherError, VoucherSigner, VoucherState, parse_voucher
from meshnode.p2p.framed import FramedStream
from meshnode.pay.channel.book import BookEntry, ChannelBook
from meshnode.pay.channel.ledger import (
    STATE_CLOSED,
    STATE_CLOSING,
    ChannelRecord,
    ChannelRef,
    Ledger,
)
from meshnode.pay.channel.protocol import (
    CHANNEL_PROTOCOL,
    UINT64_MAX,
    Announce,
    Announced,
    CloseRequest,
    CloseSigned,
    Refusal,
    parse_reply,
    signed_by,
)
from meshnode.pay.contract.cells import (
    CHANNEL_STATE_AWAITING_FINALIZATION,
    CHANNEL_STATE_CLOSURE_STARTED,
    CHANNEL_STATE_OPEN,
    CHANNEL_STATE_SETTLING_CONDITIONALS,
    CHANNEL_STATE_UNINITED,
    FEE_RESERVE,
    ChannelConfig,
    ClosingConfig,
    CooperativeClose,
    challenge_quarantined_state_body,
    channel_address,
    channel_data,
    finish_uncooperative_close_body,
    init_channel_body,
    start_uncooperative_close_body,
    state_init,
)
from meshnode.pay.metering.payer import DEFAULT_CLIENT_WINDOW_TOKENS, ChannelPayer
from meshnode.pay.ton.chain import Chain, SendResult
from meshnode.pay.ton.onchain import ChannelView, on_chain, raw_address, read_channel

log = logging.getLogger(__name__)

DEFAULT_CLOSING = ClosingConfig(
    quarantine_duration=3 * 24 * 3600,
    misbehavior_fine=10_000_000,
    conditional_close_duration=3600,
)
"""Three days of quarantine lets a provider that is down for a weekend still challenge
a stale close; a 0.01 TON fine makes trying one cost more than its gas."""

SIGNED_OP_VALUE = 0
"""Nanoton sent with init/close/challenge: they move no money in (the emulator gives
zero-value messages gas; the fee on the real network is still to be measured)."""

CHANNEL_REQUEST_TIMEOUT_S = 15.0
"""An announce needs the provider to read the chain once; 15 s covers a slow liteserver."""

WATCH_INTERVAL_S = 60.0
"""The provider looks at its channels once a minute: quarantines last hours or days."""


class ChannelError(MeshnodeError):
    """A channel operation failed; ``code`` is stable, the message says what to do."""

    label = "channel error"

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code


@dataclass(frozen=True, slots=True)
class Payee:
    """Where a channel pays to: the provider's channel key and wallet (from its advert)."""

    channel_public_key: bytes
    wallet: Address


@dataclass(frozen=True, slots=True)
class ChannelStatus:
    channel_id: int
    address: Address
    state: int
    deposit: int
    balance_a: int
    balance_b: int
    paid_seqno: int
    paid_sent: int
    quarantine_seqno_a: int | None

    @property
    def is_open(self) -> bool:
        return self.state == CHANNEL_STATE_OPEN


def _check_sent(result: SendResult, what: str) -> SendResult:
    if not result.success:
        raise ChannelError("chain_refused", f"{what} failed on chain (exit {result.exit_code})")
    return result


async def _request(host: IHost, peer: ID, request: Any, reply: type[Any]) -> Any:
    with trio.fail_after(CHANNEL_REQUEST_TIMEOUT_S):
        stream = await host.new_stream(peer, [TProtocol(CHANNEL_PROTOCOL)])
        fs = FramedStream(stream)
        try:
            await fs.send_map(request.to_wire())
            answer = parse_reply(await fs.recv_map(CHANNEL_REQUEST_TIMEOUT_S), reply)
        finally:
            await fs.close()
    if isinstance(answer, Refusal):
        raise ChannelError(answer.code, answer.msg)
    return answer


@dataclass
class ClientChannel:
    """The client's handle on one channel it opened (party A)."""

    chain: Chain
    wallet: Address
    signer: VoucherSigner
    entry: BookEntry
    ledger: Ledger
    book: ChannelBook
    latest: Voucher | None = None
    owed: int = 0
    """What this client counts as owed on the channel: the cost of its recorded jobs."""
    uncertain: bool = False
    """Its last job ended after Accept but without a bill (tokens may have been in flight)."""

    @property
    def channel_id(self) -> int:
        return self.entry.config.channel_id

    @property
    def ref(self) -> ChannelRef:
        return ChannelRef(self.channel_id, self.signer.public_key)

    @property
    def debt(self) -> int:
        """Received but not yet paid (a job broke before its last voucher)."""
        return max(0, self.owed - (self.latest.sent if self.latest else 0))

    @property
    def unspent(self) -> int:
        """Deposit not yet owed to the provider."""
        return self.deposit - max(self.owed, self.latest.sent if self.latest else 0)

    @property
    def address(self) -> Address:
        return self.entry.address

    @property
    def deposit(self) -> int:
        return self.entry.deposit

    # --- opening ----------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        chain: Chain,
        wallet: Address,
        signer: VoucherSigner,
        payee: Payee,
        deposit: int,
        *,
        code: Cell,
        ledger: Ledger,
        book: ChannelBook,
        closing: ClosingConfig = DEFAULT_CLOSING,
        channel_id: int | None = None,
    ) -> ClientChannel:
        """Deploy the channel with ``deposit`` from ``wallet`` and init it: one message."""
        if deposit <= 0:
            raise ChannelError("bad_deposit", "the deposit must be positive")
        config = ChannelConfig(
            channel_id=channel_id if channel_id is not None else 1 + secrets.randbelow(UINT64_MAX),
            key_a=signer.public_key,
            key_b=payee.channel_public_key,
            address_a=wallet,
            address_b=payee.wallet,
            closing=closing,
        )
        entry = BookEntry(config, channel_address(code, config), deposit)
        # Written before any money moves, so a crash mid-open still finds the contract.
        await trio.to_thread.run_sync(book.save, entry)
        record = ChannelRecord(
            config.channel_id, signer.public_key, deposit, chain.now(),
            address=raw_address(entry.address),
        )
        await trio.to_thread.run_sync(ledger.add_channel, record)
        # One message deploys, funds and inits: the contract checks init's balances
        # against its balance *with* the message's value, so no separate top-up is needed.
        init = state_init(code, channel_data(config))
        body = init_channel_body(config.channel_id, deposit, 0, is_a=True, signer=signer)
        deploy = await on_chain(
            chain.send, wallet, entry.address, deposit + FEE_RESERVE, body, init
        )
        _check_sent(deploy, "deploy, deposit and init")
        channel = cls(chain, wallet, signer, entry, ledger, book)
        view = await channel.view()
        if view.state != CHANNEL_STATE_OPEN or view.balance_a != deposit:
            raise ChannelError(
                "not_open", f"channel state {view.state}, balance A {view.balance_a}"
            )
        return channel

    @classmethod
    async def load(
        cls,
        chain: Chain,
        wallet: Address,
        signer: VoucherSigner,
        channel_id: int,
        *,
        ledger: Ledger,
        book: ChannelBook,
    ) -> ClientChannel:
        """A channel opened earlier (after a restart): its config and latest voucher."""
        entry = await trio.to_thread.run_sync(book.load, channel_id)
        if entry is None:
            raise ChannelError("unknown_channel", f"no channel {channel_id:#x} in this data dir")
        return await cls.from_entry(chain, wallet, signer, entry, ledger=ledger, book=book)

    @classmethod
    async def from_entry(
        cls,
        chain: Chain,
        wallet: Address,
        signer: VoucherSigner,
        entry: BookEntry,
        *,
        ledger: Ledger,
        book: ChannelBook,
    ) -> ClientChannel:
        """A channel from its book entry, with its latest voucher and what is owed."""
        ref = ChannelRef(entry.config.channel_id, signer.public_key)
        stored = await trio.to_thread.run_sync(ledger.latest_voucher, ref)
        jobs = await trio.to_thread.run_sync(ledger.jobs, ref)
        return cls(
            chain, wallet, signer, entry, ledger, book,
            latest=stored.voucher if stored else None,
            owed=sum(j.cost for j in jobs),
            uncertain=bool(jobs) and not jobs[-1].complete,
        )

    async def announce(self, host: IHost, provider: ID) -> None:
        """Tell the provider about the channel; keep its signed zero state for closing."""
        config = self.entry.config
        request = Announce(
            channel_id=config.channel_id,
            key_a=config.key_a,
            address_a=raw_address(config.address_a),
            quarantine_duration=config.closing.quarantine_duration,
            misbehavior_fine=config.closing.misbehavior_fine,
            conditional_close_duration=config.closing.conditional_close_duration,
            excess_fee=config.excess_fee,
        )
        answer: Announced = await _request(host, provider, request, Announced)
        if answer.deposit != self.deposit:
            raise ChannelError("deposit_mismatch", f"provider sees {answer.deposit}")
        try:
            state_b = parse_voucher(answer.state_b)
            state_b.verify(config.key_b)
        except VoucherError as exc:
            raise ChannelError("bad_counter_state", str(exc)) from exc
        if state_b.state != VoucherState(config.channel_id, 0, 0):
            raise ChannelError("bad_counter_state", "the provider's state must be seqno 0, sent 0")
        self.entry = BookEntry(
            config, self.address, self.deposit, answer.state_b, peer_id=provider.to_base58()
        )
        await trio.to_thread.run_sync(self.book.save, self.entry)

    def payer(
        self, price: Price, credit_window_tokens: int = DEFAULT_CLIENT_WINDOW_TOKENS
    ) -> ChannelPayer:
        """A Payer for one job at ``price`` (the provider's advertised price)."""
        return ChannelPayer(self, price, credit_window_tokens)

    # --- status -----------------------------------------------------------------------

    async def view(self) -> ChannelView:
        return await on_chain(read_channel, self.chain, self.address)

    async def status(self) -> ChannelStatus:
        view = await self.view()
        quarantine = view.quarantine
        return ChannelStatus(
            channel_id=self.channel_id,
            address=self.address,
            state=view.state,
            deposit=self.deposit,
            balance_a=view.balance_a,
            balance_b=view.balance_b,
            paid_seqno=self.latest.seqno if self.latest else 0,
            paid_sent=self.latest.sent if self.latest else 0,
            quarantine_seqno_a=quarantine.seqno_a if quarantine else None,
        )

    # --- closing ----------------------------------------------------------------------

    async def _closing_voucher(self) -> Voucher:
        """The voucher a close pays: the latest one, or a new one paying any debt (what
        jobs received but did not pay before they broke); a zero one (seqno 1) if no
        job ever ran, since every close needs A's seqno above the committed 0."""
        latest = self.latest
        if latest is None or latest.sent < self.owed:
            seqno = 1 if latest is None else latest.seqno + 1
            sent = min(self.owed, self.deposit)
            voucher = self.signer.sign(VoucherState(self.channel_id, seqno, sent))
            await trio.to_thread.run_sync(
                self.ledger.record_voucher, self.ref, voucher, self.chain.now()
            )
            self.latest = voucher
        assert self.latest is not None
        return self.latest

    async def close(self, host: IHost, provider: ID) -> CooperativeClose:
        """Cooperative close paying exactly the latest voucher; one on-chain message."""
        voucher = await self._closing_voucher()
        split = CooperativeClose.settling(voucher, self.deposit)
        signature_a = split.sign(self.signer)
        request = CloseRequest(self.channel_id, self.signer.public_key, voucher.to_boc(),
                               signature_a)
        answer: CloseSigned = await _request(host, provider, request, CloseSigned)
        if not signed_by(self.entry.config.key_b, split.to_cell(), answer.signature_b):
            raise ChannelError("bad_signature", "the provider's close signature does not verify")
        body = split.body(signature_a, answer.signature_b)
        sent = await on_chain(self.chain.send, self.wallet, self.address, SIGNED_OP_VALUE, body)
        _check_sent(sent, "cooperative close")
        await trio.to_thread.run_sync(self.ledger.set_state, self.ref, STATE_CLOSED)
        return split

    def _counter_state(self) -> Voucher:
        if self.entry.counter_state is None:
            raise ChannelError(
                "not_announced", "no provider state on file: announce the channel first"
            )
        return parse_voucher(self.entry.counter_state)

    async def start_uncooperative_close(self, voucher: Voucher | None = None) -> None:
        """Submit ``voucher`` (default: the latest) for quarantine."""
        state_a = voucher or await self._closing_voucher()
        body = start_uncooperative_close_body(
            self.channel_id, state_a, self._counter_state(), is_a=True, signer=self.signer
        )
        sent = await on_chain(self.chain.send, self.wallet, self.address, SIGNED_OP_VALUE, body)
        _check_sent(sent, "start uncooperative close")

    async def finish_uncooperative_close(self) -> None:
        """Pay out the quarantined state once quarantine and settling time are over."""
        body = finish_uncooperative_close_body()
        sent = await on_chain(self.chain.send, self.wallet, self.address, SIGNED_OP_VALUE, body)
        _check_sent(sent, "finish uncooperative close")


@dataclass(frozen=True, slots=True)
class WatchAction:
    channel_id: int
    action: str
    """``challenged`` or ``finished``."""


class ChannelWatcher:
    """Provider side: answer stale uncooperative closes, and collect finished ones."""

    def __init__(
        self,
        chain: Chain,
        signer: VoucherSigner,
        wallet: Address,
        ledger: Ledger,
        book: ChannelBook,
        *,
        interval_s: float = WATCH_INTERVAL_S,
    ) -> None:
        self.chain = chain
        self.signer = signer
        self.wallet = wallet
        self.ledger = ledger
        self.book = book
        self.interval_s = interval_s
        self.actions: list[WatchAction] = []

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            try:
                await self.check_once()
            except Exception:  # one bad channel or chain hiccup must not stop the watch
                log.exception("channel watch pass failed; retrying next interval")
            await trio.sleep(self.interval_s)

    def _mark(self, ref: ChannelRef, state: str) -> None:
        if self.ledger.channel(ref) is not None:
            self.ledger.set_state(ref, state)

    async def start_close(self, ref: ChannelRef) -> int:
        """Withdraw from a client that stays away: start an uncooperative close with the
        latest voucher this provider holds. The watcher finishes it once the quarantine
        and settling time are over (``check_once``). Returns what the close will pay."""
        entries = await trio.to_thread.run_sync(self.book.all)
        entry = next((e for e in entries if e.config.channel_id == ref.channel_id
                      and e.config.key_a == ref.client_key), None)
        if entry is None:
            raise ChannelError("unknown_channel", f"no channel {ref} in this provider's book")
        stored = await trio.to_thread.run_sync(self.ledger.latest_voucher, ref)
        if stored is None:
            raise ChannelError("no_voucher", f"channel {ref} never paid: nothing to withdraw")
        own = self.signer.sign(VoucherState(ref.channel_id, 0, 0))  # B never pays A
        body = start_uncooperative_close_body(
            ref.channel_id, stored.voucher, own, is_a=False, signer=self.signer
        )
        sent = await on_chain(self.chain.send, self.wallet, entry.address, SIGNED_OP_VALUE, body)
        _check_sent(sent, "start uncooperative close")
        await trio.to_thread.run_sync(self._mark, ref, STATE_CLOSING)  # no job may run on it
        log.info("channel %s: started closing on chain with voucher %d/%d", ref,
                 stored.voucher.seqno, stored.voucher.sent)
        return stored.voucher.sent

    async def check_once(self) -> list[WatchAction]:
        done: list[WatchAction] = []
        for entry in await trio.to_thread.run_sync(self.book.all):
            action = await self._check(entry)
            if action is not None:
                done.append(action)
        self.actions.extend(done)
        return done

    async def _check(self, entry: BookEntry) -> WatchAction | None:
        ref = ChannelRef(entry.config.channel_id, entry.config.key_a)
        view = await on_chain(read_channel, self.chain, entry.address)
        closing = view.state in (
            CHANNEL_STATE_CLOSURE_STARTED,
            CHANNEL_STATE_SETTLING_CONDITIONALS,
            CHANNEL_STATE_AWAITING_FINALIZATION,
        )
        if view.state == CHANNEL_STATE_UNINITED and view.balance_a == 0:
            # Closed (cooperatively, or an uncooperative close finished): no more jobs.
            await trio.to_thread.run_sync(self._mark, ref, STATE_CLOSED)
            return None
        if closing:
            await trio.to_thread.run_sync(self._mark, ref, STATE_CLOSING)
        if not closing or view.quarantine is None:
            return None
        channel_id = entry.config.channel_id
        quarantine = view.quarantine
        now = self.chain.now()
        in_quarantine = now < quarantine.started_at + view.quarantine_duration
        stored = await trio.to_thread.run_sync(self.ledger.latest_voucher, ref)
        if in_quarantine and stored is not None and stored.voucher.seqno > quarantine.seqno_a:
            own = self.signer.sign(VoucherState(channel_id, 0, 0))
            body = challenge_quarantined_state_body(
                channel_id, stored.voucher, own, is_a=False, signer=self.signer
            )
            sent = await on_chain(
                self.chain.send, self.wallet, entry.address, SIGNED_OP_VALUE, body
            )
            _check_sent(sent, "challenge")
            log.warning(
                "channel %#x: challenged a stale close (seqno %d < %d)",
                channel_id,
                quarantine.seqno_a,
                stored.voucher.seqno,
            )
            return WatchAction(channel_id, "challenged")
        deadline = (
            quarantine.started_at + view.quarantine_duration + view.conditional_close_duration
        )
        if now > deadline:
            body = finish_uncooperative_close_body()
            sent = await on_chain(
                self.chain.send, self.wallet, entry.address, SIGNED_OP_VALUE, body
            )
            _check_sent(sent, "finish uncooperative close")
            return WatchAction(channel_id, "finished")
        return None
