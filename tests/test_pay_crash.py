"""A provider killed with SIGKILL mid-job keeps every voucher it accepted: it writes each
one to its ledger before producing the tokens that voucher pays for."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio
from pay_net import DEPOSIT, PRICE, WINDOW_TOKENS, pay_net
from pytoniq_core.boc.cell import Cell

from meshnode.jobs.client import JobError
from meshnode.node import client_node
from meshnode.pay.channel.ledger import ChannelRecord, Ledger

if TYPE_CHECKING:
    from meshnode.engine.llama import LlamaEngine

pytestmark = pytest.mark.slow

PROVIDER_SCRIPT = Path(__file__).with_name("pay_provider_proc.py")
STARTUP_TIMEOUT_S = 60.0  # importing llama.cpp and libp2p on a busy 2-core box
VOUCHERS_BEFORE_KILL = 3


async def test_provider_killed_right_after_accepting_a_voucher_has_it_on_disk(
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
        str(VOUCHERS_BEFORE_KILL),  # the provider SIGKILLs itself right after this one
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        with trio.fail_after(STARTUP_TIMEOUT_S):
            # trio-typing (pulled in by libp2p) has stale stubs without abandon_on_cancel.
            line = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                proc.stdout.readline, abandon_on_cancel=True
            )
        started = json.loads(line)
        # The provider's own ledger connection commits with WAL + synchronous=FULL (2):
        # a voucher is fsynced before accept_voucher returns, so even power loss keeps it.
        assert (started["journal_mode"], started["synchronous"]) == ("wal", 2)
        payer = channel.payer(PRICE, WINDOW_TOKENS)
        params = {"temperature": 0.0, "seed": 7, "logit_bias": steady_logit_bias(tiny_engine)}
        async with client_node(allow_insecure=True) as client:
            advert = await client.connect(started["addr"])
            with trio.fail_after(STARTUP_TIMEOUT_S), pytest.raises(JobError) as info:
                await client.ask(advert, "hello world", max_tokens=200, params=params,
                                 payer=payer)
        assert info.value.code == "disconnected"
        with trio.fail_after(STARTUP_TIMEOUT_S):
            await trio.to_thread.run_sync(proc.wait)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    sent = payer.vouchers
    # The provider died before asking for more: the last voucher sent is the one it took.
    assert len(sent) == VOUCHERS_BEFORE_KILL
    with Ledger(home) as reopened:
        stored = reopened.latest_voucher(channel.ref)
    assert stored is not None
    assert stored.voucher == sent[-1]


def test_the_ledgers_own_connection_commits_with_synchronous_full(tmp_path: Path) -> None:
    with Ledger(tmp_path) as ledger:
        assert ledger.durability() == ("wal", 2)
