"""`meshnode peers` and `meshnode models`: the mesh as a light client sees it."""

from __future__ import annotations

from typing import Any

import trio
import typer

from meshnode.cli.common import (
    BootstrapOpt,
    InsecureOpt,
    VerboseOpt,
    WaitOpt,
    bootstrap_addrs,
    err,
    out,
    run,
    setup_logging,
)


def register(app: typer.Typer) -> None:
    app.command()(peers)
    app.command()(models)


def _directory_snapshot(
    bootstrap: list[str] | None, insecure: bool, wait_s: float
) -> tuple[list[Any], list[Any], dict[str, bool]]:
    from meshnode.node import client_node

    boot = bootstrap_addrs(bootstrap)
    if not boot:
        err.print("[red]no bootstrap peers (--bootstrap, or entries in the packaged peers.toml)[/]")
        raise typer.Exit(2)

    async def main() -> tuple[list[Any], list[Any], dict[str, bool]]:
        import time

        async with client_node(allow_insecure=insecure, bootstrap=boot) as client:
            await trio.sleep(wait_s)  # gossip brings whatever the snapshot missed
            await client.verify_pending()
            now = time.time()
            return client.directory.peers(now), client.directory.models(now), client.insecure

    result: tuple[list[Any], list[Any], dict[str, bool]] = run(main)
    return result



def peers(
    bootstrap: BootstrapOpt = None, wait: WaitOpt = 2.0, insecure: InsecureOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Join the mesh as a light client and list the providers it knows."""
    from rich.table import Table

    setup_logging(verbose)
    listings, _, insecure_by_peer = _directory_snapshot(bootstrap, insecure, wait)
    table = Table(title=f"{len(listings)} provider(s)")
    for col in ("peer", "models", "load", "tok/s", "attestation", "addresses"):
        table.add_column(col)
    for lst in listings:
        a = lst.advert
        table.add_row(
            a.peer_id,
            ", ".join(m.name for m in a.models),
            f"{a.load.busy_slots}/{a.capacity.slots} +{a.load.queue_len}",
            f"{a.capacity.tokens_per_s:.1f}",
            f"{lst.verification.value}"
            + (" (no TEE)" if insecure_by_peer.get(a.peer_id) else "")
            + f": {lst.verification_reason[:40]}",
            "\n".join(a.addrs),
        )
    out.print(table)


def models(
    bootstrap: BootstrapOpt = None, wait: WaitOpt = 2.0, insecure: InsecureOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Join the mesh as a light client and list the models it serves."""
    from rich.table import Table

    setup_logging(verbose)
    _, summaries, _ = _directory_snapshot(bootstrap, insecure, wait)
    table = Table(title=f"{len(summaries)} model(s)")
    for col in ("name", "id", "quant", "ctx", "providers", "verified", "min price /1k (nTON)"):
        table.add_column(col)
    for m in summaries:
        table.add_row(
            m.name, m.id[:16] + "…", m.quant, str(m.ctx), str(m.providers),
            str(m.verified_providers),
            f"{m.min_price_prompt_per_1k} / {m.min_price_completion_per_1k}",
        )
    out.print(table)
