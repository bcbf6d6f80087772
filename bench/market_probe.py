"""Probes of the market loop on a loopback mesh (the closing numbers of issue 10).

    .venv/bin/python bench/market_probe.py abandon  [--seconds 60] [--deposit 1]
    .venv/bin/python bench/market_probe.py flood    [--seconds 60] [--flooders 20] [--deposit 1]
    .venv/bin/python bench/market_probe.py newcomer [--jobs 50] [--liar]

- ``abandon``: a provider priced at 1,000 nanoton per completion token; a client opens
  a channel with ``--deposit`` nanoton (1 by default) and, for a minute, starts jobs and
  abandons each one when asked to pay. Counts the completion tokens it got for free.
- ``flood``: the same abandoning channel (``--deposit``) floods the provider with jobs
  from ``--flooders`` concurrent loops, while a funded client makes 12 paid asks spread over
  the minute. Counts the paid asks served.
- ``newcomer``: a client measures provider A, then B joins (its advert says 0 tok/s, or
  with ``--liar`` 10,000 tok/s while it really decodes at 40); counts B's share of the
  next ``--jobs`` jobs.

Real parts throughout: libp2p hosts on 127.0.0.1, llama.cpp on the generated tiny model,
the payment-channel contract in the TVM emulator. The probes use only APIs that existed
before issue 10 as well, but meshnode/pay/ was split into packages since: to measure the
code before (7c16d0f), run this file as it was at 203b213 (the old module paths) from a
checkout of it: ``git worktree add --detach B 7c16d0f; git show
203b213:bench/market_probe.py > B/bench/market_probe_old.py; PYTHONPATH=B python
B/bench/market_probe_old.py ...`` (it writes B/bench/results/). Writes
bench/results/market_<probe>[_<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID
from pytoniq_core.boc.address import Address

from meshnode.core.advert import Advert, TonPayee
from meshnode.core.channel_auth import sign_job_auth
from meshnode.core.meter import Price
from meshnode.engine.llama import LlamaEngine, steady_logit_bias
from meshnode.engine.tinymodel import tiny_model_path
from meshnode.identity import NodeIdentity
from meshnode.jobs.client import JobError, JobRequest, run_job
from meshnode.jobs.payment_gate import PaymentRejected
from meshnode.node import ClientNode, ProviderNode, ProviderSettings, client_node, provider_node
from meshnode.pay.channel.lifecycle import ClientChannel, Payee
from meshnode.pay.contract.cells import ClosingConfig
from meshnode.pay.contract.code import load_payment_channel_code
from meshnode.pay.setup.wiring import ClientPayments, ProviderPayments
from meshnode.pay.ton.emulator import EmulatedChain
from meshnode.pay.ton.onchain import raw_address

RESULTS = Path(__file__).parent / "results"
TON = 10**9
PRICE = Price(prompt_per_1k=0, completion_per_1k=1_000_000)  # 1,000 nanoton per token
WINDOW = 32  # `meshnode serve`'s default credit window
CLOSING = ClosingConfig(3600, TON // 100, 60)
CLIENT_WALLET = Address((0, bytes([0xC1]) * 32))
FUNDED_WALLET = Address((0, bytes([0xC2]) * 32))
PROVIDER_WALLET = Address((0, bytes([0xB0]) * 32))
MAX_TOKENS = 200
PAID_ASKS = 12


class Abandoner:
    """A payer that names its channel with the key's proof and never pays: the first
    NeedPayment ends the job (the client resets the stream)."""

    def __init__(self, channel: ClientChannel) -> None:
        self._channel = channel

    @property
    def channel_id(self) -> int | None:
        return self._channel.channel_id

    @property
    def charged(self) -> int:
        return 0

    def begin(self, prompt: str) -> None:
        return None

    def authorize(self, job_id: bytes, client_pub: bytes, provider_peer_id: str) -> bytes:
        return sign_job_auth(self._channel.signer, job_id, client_pub,
                             self._channel.channel_id, provider_peer_id)

    def channel_key(self) -> bytes:
        return self._channel.signer.public_key

    def accepted(self, prompt_tokens: int | None, owed_before: int | None) -> None:
        return None

    async def voucher_for(self, owed: int, received: int) -> bytes:
        raise PaymentRejected("abandoned", "this client never pays")

    def check_usage(self, usage: Any) -> None:
        return None

    async def finish(self, received: int, complete: bool) -> None:
        return None


async def _market(stack: AsyncExitStack, tmp: Path, slots: int = 1,
                  max_queue: int = 4) -> tuple[EmulatedChain, ProviderNode, ClientNode,
                                               ClientPayments, Advert, LlamaEngine]:
    code = load_payment_channel_code()
    chain = EmulatedChain(start_time=int(time.time()))
    for wallet in (CLIENT_WALLET, FUNDED_WALLET, PROVIDER_WALLET):
        chain.add_wallet(wallet, 100 * TON)
    pay = ProviderPayments.at(tmp / "provider", chain, PROVIDER_WALLET, PRICE, WINDOW, code)
    engine = await LlamaEngine.load(tiny_model_path(tmp / "models"), n_ctx=512)
    stack.push_async_callback(engine.aclose)
    settings = ProviderSettings(
        slots=slots, max_queue=max_queue,
        price_prompt_per_1k=PRICE.prompt_per_1k,
        price_completion_per_1k=PRICE.completion_per_1k,
        ton=TonPayee(pay.keys.channel_public, raw_address(PROVIDER_WALLET)),
    )
    prov = await stack.enter_async_context(provider_node(
        engine, identity=NodeIdentity.generate(), settings=settings, gate_factory=pay.gates))
    pay.service.install(prov.host)
    client = await stack.enter_async_context(client_node(allow_insecure=True))
    advert = await client.connect(prov.addrs[0])
    client_pay = ClientPayments.at(tmp / "client", chain, CLIENT_WALLET, code)
    return chain, prov, client, client_pay, advert, engine


async def _open(chain: EmulatedChain, client: ClientNode, pays: ClientPayments,
                advert: Advert, wallet: Address, deposit: int) -> ClientChannel:
    assert advert.ton is not None
    channel = await ClientChannel.open(
        chain, wallet, pays.keys.channel_signer(),
        Payee(advert.ton.channel_pubkey, Address(advert.ton.wallet_address)), deposit,
        code=pays.code, ledger=pays.ledger, book=pays.book, closing=CLOSING,
    )
    await channel.announce(client.host, ID.from_base58(advert.peer_id))
    return channel


async def _abandoning_job(client: ClientNode, advert: Advert, payer: Abandoner,
                          params: dict[str, Any]) -> int:
    request = JobRequest(model_id=advert.models[0].id, prompt="tell me a long story",
                         max_tokens=MAX_TOKENS, params=params)
    try:
        res = await run_job(client.host, ID.from_base58(advert.peer_id), advert.job_pubkey,
                            request, payer=payer)  # type: ignore[arg-type]
        return res.usage.completion_tokens  # would mean the provider never asked
    except JobError as exc:
        return exc.received_tokens


async def abandon(seconds: float, deposit: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with AsyncExitStack() as stack:
            chain, prov, client, pays, advert, engine = await _market(stack, Path(tmp))
            channel = await _open(chain, client, pays, advert, CLIENT_WALLET, deposit)
            payer = Abandoner(channel)
            params = {"temperature": 0.0, "logit_bias": steady_logit_bias(engine)}
            jobs = free = 0
            per_job: list[int] = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                got = await _abandoning_job(client, advert, payer, params)
                jobs += 1
                free += got
                if len(per_job) < 5:
                    per_job.append(got)
                await trio.sleep(0)
            return {"probe": "abandon", "seconds": seconds, "deposit_nanoton": deposit,
                    "jobs": jobs, "free_completion_tokens": free,
                    "free_tokens_per_min": round(free * 60 / seconds),
                    "first_jobs_tokens": per_job,
                    "provider_errors": dict(prov.jobs.stats.errors)}


async def flood(seconds: float, flooders: int, deposit: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with AsyncExitStack() as stack:
            chain, prov, client, pays, advert, engine = await _market(stack, Path(tmp))
            cheap = await _open(chain, client, pays, advert, CLIENT_WALLET, deposit)
            funded_pays = ClientPayments.at(Path(tmp) / "funded", chain, FUNDED_WALLET,
                                            pays.code)
            funded = await _open(chain, client, funded_pays, advert, FUNDED_WALLET, TON)
            params = {"temperature": 0.0, "logit_bias": steady_logit_bias(engine)}
            flood_jobs = [0]
            outcomes: list[str] = []
            async with trio.open_nursery() as nursery:
                async def flooder() -> None:
                    payer = Abandoner(cheap)
                    while True:
                        await _abandoning_job(client, advert, payer, params)
                        flood_jobs[0] += 1
                        await trio.sleep(0)

                for _ in range(flooders):
                    nursery.start_soon(flooder)
                for i in range(PAID_ASKS):
                    await trio.sleep(seconds / PAID_ASKS)
                    try:
                        res = await client.ask(advert, f"paid ask {i}", max_tokens=16,
                                               params=params, payer=funded.payer(PRICE, WINDOW))
                        outcomes.append("served" if res.usage.completion_tokens else "empty")
                    except JobError as exc:
                        outcomes.append(exc.code)
                nursery.cancel_scope.cancel()
            return {"probe": "flood", "seconds": seconds, "flooders": flooders,
                    "deposit_nanoton": deposit,
                    "paid_asks": PAID_ASKS, "served": outcomes.count("served"),
                    "outcomes": outcomes, "flood_jobs": flood_jobs[0],
                    "busy_refusals": prov.jobs.stats.busy_refusals,
                    "provider_errors": dict(prov.jobs.stats.errors)}


async def newcomer(jobs: int, liar: bool) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).parent))
    from routing_mesh import PacedEngine

    rate = 150.0
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_model_path(Path(tmp) / "models")
        async with AsyncExitStack() as stack:
            engines = [PacedEngine(await LlamaEngine.load(path, n_ctx=512), r)
                       for r in (rate, 40.0 if liar else rate)]
            for e in engines:
                stack.push_async_callback(e.aclose)
            old = await stack.enter_async_context(provider_node(
                engines[0], identity=NodeIdentity.generate(),  # type: ignore[arg-type]
                settings=ProviderSettings(tokens_per_s_hint=rate)))
            client = await stack.enter_async_context(client_node(allow_insecure=True))
            await client.connect(old.addrs[0])
            model = engines[0].info.model_id
            params = {"temperature": 0.0, "logit_bias": steady_logit_bias(engines[0]._inner)}
            for i in range(5):  # the client measures the first provider
                await client.complete(model, f"warm {i}", max_tokens=24, params=params)
            new = await stack.enter_async_context(provider_node(
                engines[1], identity=NodeIdentity.generate(),  # type: ignore[arg-type]
                settings=ProviderSettings(tokens_per_s_hint=10_000.0 if liar else 0.0)))
            await client.connect(new.addrs[0])
            served = []
            for i in range(jobs):
                res = await client.complete(model, f"job {i}", max_tokens=24, params=params)
                served.append("new" if res.providers[-1] == new.peer_id else "old")
            first = served.index("new") + 1 if "new" in served else None
            return {"probe": "newcomer", "liar": liar, "jobs": jobs,
                    "new_share": served.count("new"), "first_new_job": first,
                    "new_decodes_tok_s": 40.0 if liar else rate, "old_decodes_tok_s": rate,
                    "order": "".join("N" if s == "new" else "o" for s in served)}


def _commit() -> str | None:
    """The checkout measured (None outside a git work tree)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probe", choices=["abandon", "flood", "newcomer"])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--deposit", type=int, default=1,
                        help="nanoton in the abandoning channel (abandon, flood)")
    parser.add_argument("--flooders", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--liar", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the result file")
    args = parser.parse_args()
    load_before = os.getloadavg()
    if args.probe == "abandon":
        result = trio.run(abandon, args.seconds, args.deposit)
    elif args.probe == "flood":
        result = trio.run(flood, args.seconds, args.flooders, args.deposit)
    else:
        result = trio.run(newcomer, args.jobs, args.liar)
    result["machine"] = {"cpu": platform.processor() or platform.machine(),
                         "cores": os.cpu_count(), "python": platform.python_version(),
                         # 1/5/15-minute load averages: the box may be shared
                         "load_before": [round(x, 2) for x in load_before],
                         "load_after": [round(x, 2) for x in os.getloadavg()]}
    result["commit"] = _commit()
    RESULTS.mkdir(exist_ok=True)
    name = f"market_{args.probe}{('_' + args.tag) if args.tag else ''}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
