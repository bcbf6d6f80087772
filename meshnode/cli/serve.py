"""`meshnode serve`: a provider serving one GGUF model to the mesh."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import trio
import typer

from meshnode.cli.common import (
    BootstrapOpt,
    HomeOpt,
    MetricsOpt,
    NetworkConfigOpt,
    RemoteMetricsOpt,
    VerboseOpt,
    bootstrap_addrs,
    chain_choice,
    err,
    metrics_bind,
    out,
    print_ops,
    run,
    setup_logging,
)
from meshnode.engine.supervised import RUNNER_STALL_TIMEOUT_S
from meshnode.identity import data_dir, load_or_create


def register(app: typer.Typer) -> None:
    app.command()(serve)


def serve(
    model: Annotated[Path, typer.Option("--model", help="GGUF file to serve.")],
    listen: Annotated[str, typer.Option(help="libp2p listen multiaddr.")] = (
        "/ip4/0.0.0.0/tcp/4001"
    ),
    ctx: Annotated[int, typer.Option("--ctx", help="Context length in tokens.")] = 4096,
    n_gpu_layers: Annotated[
        int | None,
        typer.Option("--n-gpu-layers",
                     help="Layers on the GPU (-1: all). Default: all on a CUDA build, else 0."),
    ] = None,
    threads: Annotated[
        int | None, typer.Option("--threads", help="Decode threads (default: half the cores).")
    ] = None,
    runner_stall_timeout: Annotated[
        float,
        typer.Option("--runner-stall-timeout",
                     help="Seconds of silence after which the engine runner is deemed hung "
                          "and restarted."),
    ] = RUNNER_STALL_TIMEOUT_S,
    slots: Annotated[
        int,
        typer.Option(help="Jobs decoded together in one batch (each reserves --ctx tokens "
                          "of KV cache)."),
    ] = 4,
    queue: Annotated[int, typer.Option(help="Jobs waiting for a slot before Busy.")] = 4,
    tee: Annotated[
        str, typer.Option(help="Attestation: 'tdx' (configfs-tsm quote) or 'dev' (no TEE).")
    ] = "dev",
    price_prompt: Annotated[
        int, typer.Option("--price-prompt", help="Nanoton per 1k prompt tokens.")
    ] = 0,
    price_completion: Annotated[
        int, typer.Option("--price-completion", help="Nanoton per 1k completion tokens.")
    ] = 0,
    bootstrap: BootstrapOpt = None,
    relay: Annotated[
        list[str] | None,
        typer.Option("--relay", help="Reserve a slot on this relay (when not reachable)."),
    ] = None,
    chain: Annotated[
        str | None,
        typer.Option(
            "--chain",
            help="Take payments on this TON chain: 'local' or 'none' (default: local when "
            "a price is set, else none).",
        ),
    ] = None,
    network_config: NetworkConfigOpt = None,
    credit_window: Annotated[
        int | None,
        typer.Option("--credit-window", help="Tokens produced ahead of payment."),
    ] = None,
    metrics: MetricsOpt = None,
    allow_remote_metrics: RemoteMetricsOpt = False,
    home: HomeOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Serve a GGUF model to the mesh (prints the peer id and multiaddrs).

    `--listen none` accepts no inbound connection: give `--relay` to be reachable.
    With a price, clients pay per token over TON payment channels (`--chain`)."""
    from meshnode.channel_ops import DEFAULT_CREDIT_WINDOW_TOKENS, format_ton, provider_payments
    from meshnode.core.meter import Price
    from meshnode.node import ProviderSettings, provider_node
    from meshnode.ops.service import start_ops
    from meshnode.ops.views import ProviderView
    from meshnode.serving import default_gpu_layers, open_engine

    setup_logging(verbose)
    if n_gpu_layers is None:
        n_gpu_layers = default_gpu_layers()
    if slots < 1:
        err.print("[red]--slots must be at least 1[/]")
        raise typer.Exit(2)
    if price_prompt < 0 or price_completion < 0:
        err.print("[red]prices cannot be negative[/]")
        raise typer.Exit(2)
    priced = price_prompt > 0 or price_completion > 0
    chain = chain or ("local" if priced else "none")
    choice = None if chain.lower() == "none" else chain_choice(chain, network_config)
    if choice is not None and not priced:
        err.print("[red]a free provider takes no payments: set --price-prompt/"
                  "--price-completion, or drop --chain[/]")
        raise typer.Exit(2)
    window = DEFAULT_CREDIT_WINDOW_TOKENS if credit_window is None else credit_window
    if window < 1:
        err.print("[red]--credit-window must be at least 1 token[/]")
        raise typer.Exit(2)
    if not model.is_file():
        err.print(f"[red]model file not found:[/] {model}")
        raise typer.Exit(2)
    if tee not in ("dev", "tdx"):
        err.print(f"[red]--tee must be 'dev' or 'tdx', not {tee!r}[/]")
        raise typer.Exit(2)
    metrics_at = metrics_bind(metrics, allow_remote_metrics)

    async def main() -> None:
        identity, created = load_or_create(data_dir(home))
        pay = None
        if choice is not None:
            pay = await provider_payments(
                data_dir(home), choice, Price(price_prompt, price_completion), window
            )
        settings = ProviderSettings(
            listen=None if listen.lower() == "none" else listen,
            bootstrap=tuple(bootstrap_addrs(bootstrap)),
            relay=tuple(relay or ()),
            slots=slots,
            max_queue=queue,
            tee=tee,
            price_prompt_per_1k=price_prompt,
            price_completion_per_1k=price_completion,
        )
        async with (
            open_engine(model, n_ctx=ctx, slots=slots, n_gpu_layers=n_gpu_layers,
                        n_threads=threads, stall_timeout_s=runner_stall_timeout,
                        console=err) as engine,
            provider_node(
                engine, identity=identity, settings=settings,
                payments=pay.payments if pay is not None else None,
            ) as node,
            trio.open_nursery() as nursery,
        ):
            out.print(f"[bold green]serving[/] {engine.info.name} ({engine.info.quant})")
            out.print(f"model id  {engine.info.model_id}")
            out.print(f"engine    runner pid {engine.pid}, {engine.slots} slot(s), loaded in "
                      f"{engine.load_s:.2f} s; {engine.plan}")
            out.print(f"peer id   {node.peer_id}" + (" (new identity)" if created else ""))
            for addr in node.addrs:
                out.print(f"listening {addr}")
            if node.announcer is not None:
                for addr in node.announcer.circuit_addrs:
                    out.print(f"relayed   {addr}")
                out.print(f"announcing to the mesh via {len(settings.bootstrap)} bootstrap peer(s)")
            else:
                out.print("[dim]no bootstrap peers: reachable by address only[/]")
            if tee == "dev":
                out.print("[yellow]attestation: dev (no TEE) — clients must opt in[/]")
            else:
                out.print("[green]attestation: TDX quote bound to this node's keys[/]")
            if pay is not None:
                assert choice is not None
                out.print(f"payments  TON channels on the {choice.kind} chain, wallet "
                          f"{pay.payee.wallet_address}, credit window {window} tokens")
                if pay.funded:
                    out.print(f"[yellow]funded[/]    {format_ton(pay.funded)} from the "
                              "local-chain faucet (dev chain: not real TON)")
            elif priced:
                out.print("[yellow]--chain none: prices are advertised but not collected[/]")
            view = ProviderView(node, pay.payments.gates if pay is not None else None)
            print_ops(await start_ops(nursery, view, home=data_dir(home), metrics=metrics_at),
                      home)
            await trio.sleep_forever()

    run(main)
