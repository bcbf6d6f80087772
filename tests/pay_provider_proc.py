"""A priced provider in its own process, for the crash test: serves jobs on 127.0.0.1
with the ledger in ``HOME`` until it is killed. Prints its address as one JSON line.

Usage: python tests/pay_provider_proc.py HOME MODEL.gguf PROMPT_PER_1K COMPLETION_PER_1K WINDOW
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio

from meshnode.core.meter import Price
from meshnode.engine.llama import LlamaEngine
from meshnode.identity import NodeIdentity
from meshnode.node import ProviderSettings, provider_node
from meshnode.pay.channel.ledger import Ledger
from meshnode.pay.metering.gates import ChannelGates

CTX = 512  # the tiny model's test context


async def serve(home: Path, model: Path, price: Price, window: int) -> None:
    gates = ChannelGates(Ledger(home), price, window)
    settings = ProviderSettings(
        price_prompt_per_1k=price.prompt_per_1k, price_completion_per_1k=price.completion_per_1k
    )
    async with await LlamaEngine.load(model, n_ctx=CTX) as engine:
        async with provider_node(
            engine, identity=NodeIdentity.generate(), settings=settings, gate_factory=gates
        ) as node:
            print(json.dumps({"addr": node.addrs[0]}), flush=True)
            await trio.sleep_forever()


if __name__ == "__main__":
    home, model, prompt_price, completion_price, window = sys.argv[1:6]
    trio.run(
        serve,
        Path(home),
        Path(model),
        Price(int(prompt_price), int(completion_price)),
        int(window),
    )
