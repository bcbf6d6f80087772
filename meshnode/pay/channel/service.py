"""Provider side of `/meshnode/channel/1`: learn announced channels, co-sign closes.

Learning a channel trusts nothing the client says: the provider rebuilds the contract
address from the announced config, its own key and wallet, and the official contract
code (so the code at that address is the audited one, and its get-methods tell the
truth), then reads the deposit and parties from the chain. A close is co-signed only
if it pays at least the latest voucher this provider accepted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from pytoniq_core.boc.address import Address
from pytoniq_core.boc.cell import Cell

from meshnode.core.voucher import VoucherError, VoucherSigner, VoucherState, parse_voucher
from meshnode.core.wire import WireError
from meshnode.p2p.framed import FramedStream, StreamClosed
from meshnode.pay.channel.book import BookEntry, ChannelBook
from meshnode.pay.channel.ledger import (
    STATE_CLOSING,
    ChannelConflict,
    ChannelRecord,
    ChannelRef,
    Ledger,
)
from meshnode.pay.channel.protocol import (
    CHANNEL_PROTOCOL,
    Announce,
    Announced,
    CloseRequest,
    CloseSigned,
    Refusal,
    parse_request,
    signed_by,
)
from meshnode.pay.contract.cells import (
    CHANNEL_STATE_OPEN,
    ChannelConfig,
    ClosingConfig,
    CooperativeClose,
    channel_address,
)
from meshnode.pay.ton.chain import Chain
from meshnode.pay.ton.onchain import ChannelReadError, on_chain, raw_address, read_channel

log = logging.getLogger(__name__)

MIN_QUARANTINE_S = 3600
"""The watcher polls every minute and a provider restarts in minutes; an hour of
quarantine leaves it time to challenge a stale close even across a restart."""

REQUEST_TIMEOUT_S = 10.0
"""A client sends its one request right after opening the stream."""


class ChannelRefused(Exception):
    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code


@dataclass
class ChannelService:
    chain: Chain
    code: Cell
    signer: VoucherSigner
    wallet: Address
    ledger: Ledger
    book: ChannelBook
    min_quarantine_s: int = MIN_QUARANTINE_S
    clock: Callable[[], float] = time.time
    busy: Callable[[ChannelRef], bool] = lambda _ref: False
    """Whether a job holds the channel (the gates'): no close is co-signed under it."""

    def install(self, host: IHost) -> None:
        host.set_stream_handler(TProtocol(CHANNEL_PROTOCOL), self.handle_stream)

    async def handle_stream(self, stream: INetStream) -> None:
        fs = FramedStream(stream)
        try:
            request = parse_request(await fs.recv_map(REQUEST_TIMEOUT_S))
            reply: Announced | CloseSigned | Refusal
            try:
                if isinstance(request, Announce):
                    reply = await self.learn(request)
                else:
                    reply = await self.co_sign_close(request)
            except ChannelRefused as exc:
                log.warning("channel request refused: %s: %s", exc.code, exc)
                reply = Refusal(exc.code, str(exc))
            await fs.send_map(reply.to_wire())
        except WireError as exc:
            log.warning("bad channel request: %s", exc)
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                await fs.send_map(Refusal("schema", str(exc)).to_wire())
        except (StreamClosed, trio.TooSlowError) as exc:
            log.info("channel request abandoned: %s", exc)
        finally:
            await fs.close()

    async def learn(self, announce: Announce) -> Announced:
        """Check an announced channel on chain and remember it."""
        if announce.quarantine_duration < self.min_quarantine_s:
            raise ChannelRefused(
                "quarantine_too_short",
                f"quarantine {announce.quarantine_duration}s < {self.min_quarantine_s}s",
            )
        try:
            address_a = Address(announce.address_a)
        except Exception as exc:  # pytoniq raises several types for a bad address
            raise ChannelRefused("bad_address", f"address_a: {exc}") from exc
        config = ChannelConfig(
            channel_id=announce.channel_id,
            key_a=announce.key_a,
            key_b=self.signer.public_key,
            address_a=address_a,
            address_b=self.wallet,
            closing=ClosingConfig(
                announce.quarantine_duration,
                announce.misbehavior_fine,
                announce.conditional_close_duration,
            ),
            excess_fee=announce.excess_fee,
        )
        address = channel_address(self.code, config)
        try:
            view = await on_chain(read_channel, self.chain, address)
        except ChannelReadError as exc:
            raise ChannelRefused("not_on_chain", str(exc)) from exc
        if view.state != CHANNEL_STATE_OPEN:
            raise ChannelRefused("not_open", f"channel state is {view.state}, not open")
        if view.balance_a <= 0:
            raise ChannelRefused("no_deposit", "the channel holds no deposit from party A")
        if view.channel_id != config.channel_id or view.key_a != config.key_a:
            raise ChannelRefused("not_on_chain", "the contract's id or key A differ")
        record = ChannelRecord(
            config.channel_id, config.key_a, view.balance_a, self.clock(),
            address=raw_address(address),
        )
        known = await trio.to_thread.run_sync(self.ledger.channel, record.ref)
        if known is not None and not known.is_open:
            raise ChannelRefused("channel_closed", f"channel {record.ref} is {known.state}")
        try:
            await trio.to_thread.run_sync(self.ledger.add_channel, record)
        except ChannelConflict as exc:  # the same key re-announced at another address
            raise ChannelRefused("channel_conflict", str(exc)) from exc
        entry = BookEntry(config, address, view.balance_a)
        await trio.to_thread.run_sync(self.book.save, entry)
        zero = self.signer.sign(VoucherState(config.channel_id, 0, 0))
        log.info("learned channel %#x, deposit %d", config.channel_id, view.balance_a)
        return Announced(deposit=view.balance_a, state_b=zero.to_boc())

    async def co_sign_close(self, request: CloseRequest) -> CloseSigned:
        """B's signature on a cooperative close that pays at least the latest voucher."""
        ref = ChannelRef(request.channel_id, request.key_a)
        record = await trio.to_thread.run_sync(self.ledger.channel, ref)
        if record is None:
            raise ChannelRefused("unknown_channel", f"channel {ref}")
        if self.busy(ref):
            raise ChannelRefused("channel_busy", "a job is running on the channel; close later")
        try:
            voucher = parse_voucher(request.voucher)
            voucher.verify(record.client_key)
        except VoucherError as exc:
            raise ChannelRefused("bad_voucher", str(exc)) from exc
        if voucher.channel_id != request.channel_id:
            raise ChannelRefused("bad_voucher", "voucher is for another channel")
        if voucher.sent > record.deposit:
            raise ChannelRefused("bad_voucher", "voucher exceeds the deposit")
        stored = await trio.to_thread.run_sync(self.ledger.latest_voucher, ref)
        if stored is not None:
            latest = stored.voucher
            if voucher.seqno < latest.seqno or voucher.sent < latest.sent:
                raise ChannelRefused(
                    "stale_voucher",
                    f"close pays seqno {voucher.seqno}/{voucher.sent}, latest accepted is "
                    f"{latest.seqno}/{latest.sent}",
                )
        if stored is None or voucher.seqno > stored.voucher.seqno:
            # Newer than anything we saw (sent before a crash): it only pays us more.
            await trio.to_thread.run_sync(self.ledger.record_voucher, ref, voucher, self.clock())
        split = CooperativeClose.settling(voucher, record.deposit)
        if not signed_by(record.client_key, split.to_cell(), request.signature_a):
            raise ChannelRefused("bad_signature", "A's signature is not on this close")
        # Signed means final: no job may run on it again (its tokens could not be paid).
        await trio.to_thread.run_sync(self.ledger.set_state, ref, STATE_CLOSING)
        return CloseSigned(signature_b=split.sign(self.signer))
