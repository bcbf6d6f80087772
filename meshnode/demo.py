"""`meshnode demo`: one provider and one light client on loopback, one paid, streamed answer.

Everything real: a libp2p host per role on 127.0.0.1 (Noise + yamux), the signed advert
fetched and verified (dev attestation, accepted only because the demo opts in), the
prompt sealed to the provider's job key, llama.cpp decoding, and per-token payment with
signed payment-channel states checked by the real TON contract code running in an
emulator (deploy + deposit, init, vouchers, cooperative close).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from pytoniq_core.boc.address import Address
from rich.console import Console

from meshnode.channel_ops import format_ton, state_name
from meshnode.core.meter import Price
from meshnode.engine.base import Engine
from meshnode.engine.demo_model import (
    DemoModel,
    find_demo_model_with_progress_bar,
    format_prompt,
)
from meshnode.engine.tinymodel import tiny_model_path
from meshnode.identity import NodeIdentity, data_dir
from meshnode.node import ClientNode, ProviderNode, ProviderSettings, client_node, provider_node
from meshnode.pay.setup.wiring import ClientPayments, ProviderPayments, close_channel, open_channel
from meshnode.pay.ton.emulator import EmulatedChain
from meshnode.serving import open_engine

# The demo model's context; its answers are short, so 2k leaves ample room.
DEMO_CTX = 2048
NANO = 10**9
DEMO_PRICE = Price(prompt_per_1k=1_000_000, completion_per_1k=4_000_000)  # 0.001/0.004 TON
DEMO_DEPOSIT = NANO // 2  # 0.5 TON: covers ~100k completion tokens at the demo price
DEMO_WINDOW_TOKENS = 8  # small, so the client is asked to pay several times per answer
# Made-up basechain wallets on the emulated chain (raw form: workchain:account hex).
CLIENT_WALLET = Address("0:" + "c1" * 32)
PROVIDER_WALLET_RAW = "0:" + "b0" * 32
PROVIDER_WALLET = Address(PROVIDER_WALLET_RAW)


def _pick_model(tiny: bool) -> DemoModel:
    cache = data_dir() / "models"
    if tiny:
        return DemoModel(tiny_model_path(cache), "tiny-llama-random", "plain", False,
                         "--tiny was given")
    return find_demo_model_with_progress_bar(cache)


async def run_demo(out: Console, err: Console, prompt: str, max_tokens: int, tiny: bool) -> int:
    model = _pick_model(tiny)
    if model.is_real:
        out.print(f"[bold]model:[/] {model.name} — a real model (Gemma terms of use)")
    else:
        out.print(f"[bold]model:[/] {model.name} — [yellow]fallback: {model.reason}[/]")
    async with open_engine(model.path, n_ctx=DEMO_CTX, console=err) as engine:
        out.print(f"[dim]engine: llama.cpp in runner process {engine.pid}; {engine.plan}[/]")
        params: dict[str, object] = {"temperature": 0.0, "stop": list(model.stop)}
        if not model.is_real:
            params["logit_bias"] = await engine.steady_logit_bias()
        return await _serve_and_ask(out, engine, model, prompt, max_tokens, params)


async def _serve_and_ask(
    out: Console, engine: Engine, model: DemoModel, prompt: str, max_tokens: int,
    params: dict[str, object],
) -> int:

    chain = EmulatedChain(start_time=int(time.time()))
    chain.add_wallet(CLIENT_WALLET, 2 * NANO)
    chain.add_wallet(PROVIDER_WALLET, NANO // 10)
    with tempfile.TemporaryDirectory(prefix="meshnode-demo-") as tmp:
        pay_p = ProviderPayments.at(
            Path(tmp) / "provider", chain, PROVIDER_WALLET, DEMO_PRICE, DEMO_WINDOW_TOKENS
        )
        pay_c = ClientPayments.at(Path(tmp) / "client", chain, CLIENT_WALLET)
        settings = ProviderSettings(
            price_prompt_per_1k=DEMO_PRICE.prompt_per_1k,
            price_completion_per_1k=DEMO_PRICE.completion_per_1k,
        )
        async with provider_node(
            engine, identity=NodeIdentity.generate(), settings=settings, payments=pay_p,
        ) as prov:
            out.print(f"[bold]provider[/] {prov.peer_id}\n         {prov.addrs[0]}")
            async with client_node(allow_insecure=True) as client:
                await _ask_and_pay(out, client, prov, pay_c, model, prompt, max_tokens,
                                   params, chain)
    return 0


async def _ask_and_pay(
    out: Console,
    client: ClientNode,
    prov: ProviderNode,
    pay_c: ClientPayments,
    model: DemoModel,
    prompt: str,
    max_tokens: int,
    params: dict[str, object],
    chain: EmulatedChain,
) -> None:
    advert = await client.connect(prov.addrs[0])
    out.print(
        f"[bold]client[/]   {client.host.get_id()} fetched and verified the signed advert "
        f"(model {advert.models[0].id[:12]}…)"
    )
    out.print("[yellow]attestation: dev — no TEE; accepted only because the demo opts in[/]")
    before = chain.balance(CLIENT_WALLET), chain.balance(PROVIDER_WALLET)
    channel = await open_channel(pay_c, client.host, advert, DEMO_DEPOSIT)
    out.print(
        f"[bold]channel[/]  {channel.channel_id:#x} opened on the emulated TON chain "
        f"(real contract code), deposit {format_ton(DEMO_DEPOSIT)}"
    )
    payer = (await pay_c.channel(channel.channel_id)).payer(DEMO_PRICE)
    out.print(f"[bold]>[/] {prompt}")

    async def on_text(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    res = await client.ask(
        advert, format_prompt(model, prompt), max_tokens=max_tokens, params=dict(params),
        on_text=on_text, payer=payer,
    )
    sys.stdout.write("\n")
    rate = res.usage.completion_tokens / max(res.elapsed_s - res.ttft_s, 1e-9)
    out.print(
        f"[dim]{res.usage.prompt_tokens} prompt + {res.usage.completion_tokens} completion "
        f"tokens; first token after {res.ttft_s * 1000:.0f} ms; {rate:.1f} tok/s; finish: "
        f"{res.usage.finish_reason}; sealed end to end (X25519 + XChaCha20-Poly1305)[/]"
    )
    out.print("[yellow]this answer ran WITHOUT a TEE (dev provider)[/]")
    latest = pay_c.ledger.latest_voucher(channel.ref)
    out.print(
        f"[bold]paid[/]     {format_ton(res.usage.cost_nanoton)} in signed vouchers "
        f"(last seqno {latest.voucher.seqno if latest else 0})"
    )
    status = await close_channel(pay_c, client.host, prov.peer_id, channel.channel_id)
    after = chain.balance(CLIENT_WALLET), chain.balance(PROVIDER_WALLET)
    out.print(
        f"[bold]closed[/]   cooperatively (on-chain state: {state_name(status.state)}); "
        f"provider wallet "
        f"+{format_ton(after[1] - before[1])}, client wallet {format_ton(after[0] - before[0])} "
        f"(emulator charges no fees)"
    )
