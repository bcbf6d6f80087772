"""`meshnode bootstrap` and `meshnode testnet`: nodes that hold the mesh together."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import trio
import typer

from meshnode.cli.common import (
    HomeOpt,
    MetricsOpt,
    RemoteMetricsOpt,
    VerboseOpt,
    err,
    metrics_bind,
    out,
    print_ops,
    run,
    setup_logging,
)
from meshnode.identity import data_dir, load_or_create


def register(app: typer.Typer) -> None:
    app.command("bootstrap")(bootstrap_cmd)
    app.command()(testnet)


def bootstrap_cmd(
    listen: Annotated[str, typer.Option(help="libp2p listen multiaddr.")] = (
        "/ip4/0.0.0.0/tcp/4001"
    ),
    peer: Annotated[
        list[str] | None, typer.Option("--peer", help="Other bootstrap nodes to join.")
    ] = None,
    no_relay: Annotated[bool, typer.Option("--no-relay", help="Do not relay.")] = False,
    metrics: MetricsOpt = None,
    allow_remote_metrics: RemoteMetricsOpt = False,
    home: HomeOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Run a bootstrap node: DHT server, advert gossip, circuit relay; serves no model."""
    from meshnode.ops.service import start_ops
    from meshnode.ops.views import BootstrapView
    from meshnode.p2p.discovery import BootstrapNode
    from meshnode.p2p.host import full_addrs, running_host

    setup_logging(verbose)
    metrics_at = metrics_bind(metrics, allow_remote_metrics)

    async def main() -> None:
        identity, _ = load_or_create(data_dir(home))
        async with running_host(identity, listen) as host, trio.open_nursery() as nursery:
            node = BootstrapNode(host, peer or [], relay=not no_relay)
            await nursery.start(node.run)
            out.print("[bold green]bootstrap node up[/] (DHT server, gossip"
                      + ("" if no_relay else ", relay") + ")")
            for addr in full_addrs(host):
                out.print(f"join with --bootstrap {addr}")
            view = BootstrapView(host, node.directory)
            print_ops(await start_ops(nursery, view, home=data_dir(home), metrics=metrics_at),
                      home)

    run(main)


def testnet(
    providers: Annotated[int, typer.Option("--providers", help="How many providers.")] = 3,
    models_: Annotated[
        int, typer.Option("--models", help="Distinct tiny models among them.")
    ] = 2,
    model: Annotated[
        Path | None, typer.Option("--model", help="Serve this GGUF on every provider instead.")
    ] = None,
    verbose: VerboseOpt = 0,
) -> None:
    """A local mesh on loopback: one bootstrap node and N providers, until Ctrl-C."""
    from contextlib import AsyncExitStack

    from meshnode.engine.tinymodel import write_tiny_llama
    from meshnode.identity import NodeIdentity
    from meshnode.node import ProviderSettings, provider_node
    from meshnode.p2p.discovery import BootstrapNode
    from meshnode.p2p.host import full_addrs, running_host
    from meshnode.serving import open_engine

    setup_logging(verbose)
    if providers < 1 or models_ < 1:
        err.print("[red]--providers and --models must be at least 1[/]")
        raise typer.Exit(2)

    async def main() -> None:
        cache = data_dir() / "models" / "testnet"
        cache.mkdir(parents=True, exist_ok=True)
        async with AsyncExitStack() as stack:
            host = await stack.enter_async_context(running_host(NodeIdentity.generate()))
            nursery = await stack.enter_async_context(trio.open_nursery())
            await nursery.start(BootstrapNode(host).run)
            boot = full_addrs(host)[0]
            for i in range(providers):
                if model is not None:
                    path = model
                else:
                    seed = i % models_
                    path = cache / f"tiny-{seed}.gguf"
                    if not path.exists():
                        write_tiny_llama(path, seed=seed, name=f"tiny-{seed}")
                engine = await stack.enter_async_context(
                    open_engine(path, n_ctx=512 if model is None else 4096, slots=4,
                                console=err))
                node = await stack.enter_async_context(provider_node(
                    engine, identity=NodeIdentity.generate(),
                    settings=ProviderSettings(bootstrap=(boot,), slots=engine.slots),
                ))
                out.print(f"provider {i}: {engine.info.name} {node.peer_id}")
            out.print(f"[bold green]testnet up[/]: join with --bootstrap {boot}")
            out.print("[yellow]providers use dev attestation: clients need --insecure[/]")
            await trio.sleep_forever()

    run(main)
