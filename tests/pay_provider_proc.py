"""A priced provider in its own process, for the crash test: serves jobs on 127.0.0.1
with the ledger in ``HOME`` until it is killed. Prints its address and its ledger's
durability settings as one JSON line.

With KILL_AFTER_VOUCHERS (> 0) the process SIGKILLs itself right after its gate has
accepted that many vouchers: after `accept_voucher` returned and before the provider
sends anything else (the next token frame), the exact point a crash must not lose the
voucher at.

Usage: python tests/pay_provider_proc.py HOME MODEL.gguf PROMPT_PER_1K COMPLETION_PER_1K
           WINDOW [KILL_AFTER_VOUCHERS]
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from meshnode.core.messages import Open
from meshnode.core.meter import Price
from meshnode.engine.llama import LlamaEngine
from meshnode.identity import NodeIdentity
from meshnode.jobs.payment_gate import PaymentGate
from meshnode.node import ProviderSettings, provider_node
from meshnode.pay.channel.ledger import Ledger
from meshnode.pay.metering.gates import ChannelGates

CTX = 512  # the tiny model's test context


class KillAfterVouchers:
    """The real gate; SIGKILLs this process once `limit` vouchers were accepted."""

    accepted = 0  # across jobs: the process dies once

    def __init__(self, inner: PaymentGate, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def accept_voucher(self, boc: bytes, delivered: int) -> None:
        await self._inner.accept_voucher(boc, delivered)
        KillAfterVouchers.accepted += 1
        if KillAfterVouchers.accepted == self._limit:
            os.kill(os.getpid(), signal.SIGKILL)


async def serve(home: Path, model: Path, price: Price, window: int, kill_after: int) -> None:
    ledger = Ledger(home)
    gates = ChannelGates(ledger, price, window)

    def gate_factory(job: Open, peer_id: str) -> PaymentGate:
        gate = gates(job, peer_id)
        return KillAfterVouchers(gate, kill_after) if kill_after else gate  # type: ignore[return-value]

    settings = ProviderSettings(
        price_prompt_per_1k=price.prompt_per_1k, price_completion_per_1k=price.completion_per_1k
    )
    async with await LlamaEngine.load(model, n_ctx=CTX) as engine:
        async with provider_node(
            engine, identity=NodeIdentity.generate(), settings=settings,
            gate_factory=gate_factory,
        ) as node:
            journal, synchronous = ledger.durability()
            print(json.dumps({"addr": node.addrs[0], "journal_mode": journal,
                              "synchronous": synchronous}), flush=True)
            await trio.sleep_forever()


if __name__ == "__main__":
    home, model, prompt_price, completion_price, window = sys.argv[1:6]
    kill_after = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    trio.run(
        serve,
        Path(home),
        Path(model),
        Price(int(prompt_price), int(completion_price)),
        int(window),
        kill_after,
    )
