"""A paid loopback mesh with operator endpoints, for the ops tests: a priced provider on
the tiny model, a light client, and each one's metrics/status HTTP endpoint."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from pay_net import PRICE, PayNet, pay_net
from pytoniq_core.boc.cell import Cell

from meshnode.identity import NodeIdentity
from meshnode.node import ClientNode, ProviderNode, ProviderSettings, client_node, provider_node
from meshnode.ops.http import serve_ops
from meshnode.ops.views import ClientView, ProviderView

if TYPE_CHECKING:
    from meshnode.engine.llama import LlamaEngine


def steady(engine: LlamaEngine) -> dict[str, Any]:
    from meshnode.engine.llama import steady_logit_bias

    return {"temperature": 0.0, "seed": 7, "logit_bias": steady_logit_bias(engine)}


@dataclass
class PaidMesh:
    net: PayNet
    provider: ProviderNode
    client: ClientNode
    provider_url: str
    client_url: str


@asynccontextmanager
async def paid_mesh(tmp_path: Path, code: Cell, engine: LlamaEngine) -> AsyncIterator[PaidMesh]:
    net = pay_net(tmp_path, code)
    settings = ProviderSettings(price_prompt_per_1k=PRICE.prompt_per_1k,
                                price_completion_per_1k=PRICE.completion_per_1k)
    async with (
        provider_node(engine, identity=NodeIdentity.generate(), settings=settings,
                      payments=net.provider) as prov,
        client_node(allow_insecure=True) as client,
        trio.open_nursery() as nursery,
    ):
        prov_url = await nursery.start(serve_ops, ProviderView(prov, net.provider.gates),
                                       "127.0.0.1", 0)
        client_url = await nursery.start(serve_ops, ClientView(client), "127.0.0.1", 0)
        yield PaidMesh(net, prov, client, prov_url, client_url)
        nursery.cancel_scope.cancel()
