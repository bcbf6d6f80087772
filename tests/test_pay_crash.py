"""A provider killed with SIGKILL mid-job keeps every voucher it accepted: it writes each
one to its ledger before producing the tokens that voucher pays for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from pay_net import DEPOSIT, PRICE, WINDOW_TOKENS, pay_net
from pytoniq_core.boc.cell import Cell

from meshnode.core.messages import Usage
from meshnode.node import client_node
from meshnode.pay.channel.ledger import ChannelRecord, Ledger
from meshnode.pay.contract.code import ContractCodeError, load_payment_channel_code
from meshnode.pay.metering.payer import ChannelPayer

if TYPE_CHECKING:
    from meshnode.engine.llama import LlamaEngine

pytestmark = pytest.mark.slow

PROVIDER_SCRIPT = Path(__file__).with_name("pay_provider_proc.py")
STARTUP_TIMEOUT_S = 60.0  # importing llama.cpp and libp2p on a busy 2-core box
VOUCHERS_BEFORE_KILL = 3


class PausingPayer:
    """Pays the first few requests, then stalls: the provider is then blocked waiting
    for payment, so every voucher the client sent was accepted (tokens followed each)."""

    def __init__(self, inner: ChannelPayer, pay_times: int) -> None:
        self.inner = inner
        self.pay_times = pay_times
        self.stalled = trio.Event()

    @property
    def channel_id(self) -> int | None:
        return self.inner.channel_id

    def begin(self, prompt: str) -> None:
        self.inner.begin(prompt)

    def authorize(self, job_id: bytes, client_pub: bytes, provider_peer_id: str) -> bytes:
        return self.inner.authorize(job_id, client_pub, provider_peer_id)

    def check_usage(self, usage: Usage) -> None:
        self.inner.check_usage(usage)

    def channel_key(self) -> bytes:
        return self.inner.channel_key()

    def accepted(self, prompt_tokens: int | None, owed_before: int | None) -> None:
        self.inner.accepted(prompt_tokens, owed_before)

    async def finish(self, received: int, complete: bool) -> None:
        await self.inner.finish(received, complete)

    async def voucher_for(self, owed: int, received: int) -> bytes:
        if len(self.inner.vouchers) >= self.pay_times:
            self.stalled.set()
            await trio.sleep_forever()
        return await self.inner.voucher_for(owed, received)


@pytest.fixture(scope="module")
def code() -> Cell:
    try:
        return load_payment_channel_code()
    except ContractCodeError as exc:
        pytest.fail(f"{exc} (run: python -m meshnode.pay.contract.code)")


async def test_provider_killed_mid_job_keeps_the_last_accepted_voucher(
    tmp_path: Path, code: Cell, tiny_gguf_path: Path, tiny_engine: LlamaEngine
) -> None:
    from meshnode.engine.llama import steady_logit_bias

    net = pay_net(tmp_path, code)
    channel = await net.open_channel()
    home = tmp_path / "crashy"
    # What the provider's announce handler stores (the chain lives in this process).
    with Ledger(home) as ledger:
        ledger.add_channel(
            ChannelRecord(channel.channel_id, channel.signer.public_key, DEPOSIT, 0.0)
        )
    argv = [
        sys.executable,
        str(PROVIDER_SCRIPT),
        str(home),
        str(tiny_gguf_path),
        str(PRICE.prompt_per_1k),
        str(PRICE.completion_per_1k),
        str(WINDOW_TOKENS),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        with trio.fail_after(STARTUP_TIMEOUT_S):
            # trio-typing (pulled in by libp2p) has stale stubs without abandon_on_cancel.
            line = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                proc.stdout.readline, abandon_on_cancel=True
            )
        addr = json.loads(line)["addr"]
        payer = PausingPayer(channel.payer(PRICE, WINDOW_TOKENS), VOUCHERS_BEFORE_KILL)
        params = {"temperature": 0.0, "seed": 7, "logit_bias": steady_logit_bias(tiny_engine)}
        async with client_node(allow_insecure=True) as client:
            advert = await client.connect(addr)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    lambda: client.ask(
                        advert, "hello world", max_tokens=200, params=params, payer=payer
                    )
                )
                with trio.fail_after(STARTUP_TIMEOUT_S):
                    await payer.stalled.wait()
                os.kill(proc.pid, signal.SIGKILL)
                await trio.to_thread.run_sync(proc.wait)
                nursery.cancel_scope.cancel()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    sent = payer.inner.vouchers
    assert len(sent) == VOUCHERS_BEFORE_KILL
    with Ledger(home) as reopened:
        stored = reopened.latest_voucher(channel.ref)
    assert stored is not None
    assert stored.voucher == sent[-1]
