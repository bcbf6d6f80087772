"""A provider process killed with SIGKILL mid-job keeps every voucher it accepted: it
writes each one to its ledger before producing the tokens that voucher pays for. One
stopped with SIGSTOP is given up on by its client within the stall bound."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
from pay_net import DEPOSIT, PRICE, WINDOW_TOKENS, pay_net
from pytoniq_core.boc.cell import Cell

from meshnode.core.job_protocol import STALL_FLOOR_S
from meshnode.jobs.client import JobError
from meshnode.node import client_node
from meshnode.pay.channel.ledger import ChannelRecord, Ledger
from meshnode.pay.channel.lifecycle import ClientChannel

if TYPE_CHECKING:
    from meshnode.engine.llama import LlamaEngine

pytestmark = pytest.mark.slow

PROVIDER_SCRIPT = Path(__file__).with_name("pay_provider_proc.py")
STARTUP_TIMEOUT_S = 60.0  # importing llama.cpp and libp2p on a busy 2-core box
VOUCHERS_BEFORE_KILL = 3
TOKENS_BEFORE_STOP = 10  # a pace is known by then (STALL_FLOOR_S applies)


@asynccontextmanager
async def provider_process(
    home: Path, channel: ClientChannel, model: Path, kill_after_vouchers: int = 0
) -> AsyncIterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A priced provider in its own process (tests/pay_provider_proc.py) that knows the
    channel; yields the process and its start-up line. Killed on exit."""
    # What the provider's announce handler stores (the chain lives in this process).
    with Ledger(home) as ledger:
        ledger.add_channel(
            ChannelRecord(channel.channel_id, channel.signer.public_key, DEPOSIT, 0.0)
        )
    argv = [
        sys.executable,
        str(PROVIDER_SCRIPT),
        str(home),
        str(model),
        str(PRICE.prompt_per_1k),
        str(PRICE.completion_per_1k),
        str(WINDOW_TOKENS),
        str(kill_after_vouchers),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        with trio.fail_after(STARTUP_TIMEOUT_S):
            # trio-typing (pulled in by libp2p) has stale stubs without abandon_on_cancel.
            line = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                proc.stdout.readline, abandon_on_cancel=True
            )
        yield proc, json.loads(line)
    finally:
        if proc.poll() is None:
            proc.kill()  # SIGKILL ends a stopped process too
            proc.wait()


def steady(engine: LlamaEngine) -> dict[str, Any]:
    from meshnode.engine.llama import steady_logit_bias

    return {"temperature": 0.0, "seed": 7, "logit_bias": steady_logit_bias(engine)}


async def test_provider_killed_right_after_accepting_a_voucher_has_it_on_disk(
    tmp_path: Path, code: Cell, tiny_gguf_path: Path, tiny_engine: LlamaEngine
) -> None:
    net = pay_net(tmp_path, code)
    channel = await net.open_channel()
    home = tmp_path / "crashy"
    payer = channel.payer(PRICE, WINDOW_TOKENS)
    # The provider SIGKILLs itself right after accepting its VOUCHERS_BEFORE_KILL-th one.
    async with provider_process(home, channel, tiny_gguf_path, VOUCHERS_BEFORE_KILL) as (
        proc, started,
    ):
        # The provider's own ledger connection commits with WAL + synchronous=FULL (2):
        # a voucher is fsynced before accept_voucher returns, so even power loss keeps it.
        assert (started["journal_mode"], started["synchronous"]) == ("wal", 2)
        async with client_node(allow_insecure=True) as client:
            advert = await client.connect(started["addr"])
            with trio.fail_after(STARTUP_TIMEOUT_S), pytest.raises(JobError) as info:
                await client.ask(advert, "hello world", max_tokens=200,
                                 params=steady(tiny_engine), payer=payer)
        assert info.value.code == "disconnected"
        with trio.fail_after(STARTUP_TIMEOUT_S):
            await trio.to_thread.run_sync(proc.wait)
    assert proc.returncode == -signal.SIGKILL
    sent = payer.vouchers
    # The provider died before asking for more: the last voucher sent is the one it took.
    assert len(sent) == VOUCHERS_BEFORE_KILL
    with Ledger(home) as reopened:
        stored = reopened.latest_voucher(channel.ref)
    assert stored is not None
    assert stored.voucher == sent[-1]


async def test_a_sigstopped_provider_is_given_up_on_within_the_stall_bound(
    tmp_path: Path, code: Cell, tiny_gguf_path: Path, tiny_engine: LlamaEngine
) -> None:
    """SIGSTOP keeps the provider's sockets open (the kernel still acknowledges what the
    client sends); only its own pace tells the client it is gone. The credit window keeps
    it from running more than WINDOW_TOKENS ahead of what the client has seen."""
    channel = await pay_net(tmp_path, code).open_channel()
    arrivals: list[float] = []
    async with provider_process(tmp_path / "stopped", channel, tiny_gguf_path) as (
        proc, started,
    ):

        async def on_text(_: str) -> None:
            arrivals.append(trio.current_time())
            if len(arrivals) == TOKENS_BEFORE_STOP:
                os.kill(proc.pid, signal.SIGSTOP)

        async with client_node(allow_insecure=True) as client:
            advert = await client.connect(started["addr"])
            # Far under the old flat TOKEN_TIMEOUT_S (120 s): the old client fails here.
            with trio.fail_after(STALL_FLOOR_S + 30), pytest.raises(JobError) as info:
                await client.ask(advert, "once upon a time", max_tokens=400,
                                 params=steady(tiny_engine), on_text=on_text,
                                 payer=channel.payer(PRICE, WINDOW_TOKENS))
    assert info.value.code == "stalled" and info.value.received_tokens >= TOKENS_BEFORE_STOP
    silence = trio.current_time() - arrivals[-1]
    assert STALL_FLOOR_S <= silence <= STALL_FLOOR_S + 2, silence


def test_the_ledgers_own_connection_commits_with_synchronous_full(tmp_path: Path) -> None:
    with Ledger(tmp_path) as ledger:
        assert ledger.durability() == ("wal", 2)
