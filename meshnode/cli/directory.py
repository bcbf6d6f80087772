"""`meshnode peers` and `meshnode models`: the mesh as a light client sees it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import trio
import typer

from meshnode.cli.common import (
    INSECURE_HINT,
    BootstrapOpt,
    InsecureOpt,
    JsonOpt,
    VerboseOpt,
    WaitOpt,
    bootstrap_addrs,
    err,
    print_json,
    run,
    setup_logging,
)
from meshnode.cli.tables import print_table, printable


def register(app: typer.Typer) -> None:
    app.command()(peers)
    app.command()(models)


@dataclass
class Snapshot:
    listings: list[Any]  # core.directory.Listing
    models: list[Any]  # core.directory.ModelSummary
    insecure: dict[str, bool]  # peer id -> admitted without a TEE
    dev_refused: int  # providers refused only for running without a TEE
    time: float


def _directory_snapshot(bootstrap: list[str] | None, insecure: bool, wait_s: float) -> Snapshot:
    from meshnode.node import client_node

    boot = bootstrap_addrs(bootstrap)
    if not boot:
        err.print("[red]no bootstrap peers (--bootstrap, or entries in the packaged "
                  "peers.toml)[/]")
        raise typer.Exit(2)

    async def main() -> Snapshot:
        import time

        async with client_node(allow_insecure=insecure, bootstrap=boot) as client:
            await trio.sleep(wait_s)  # gossip brings whatever the snapshot missed
            await client.verify_pending()
            now = time.time()
            return Snapshot(client.directory.peers(now), client.directory.models(now),
                            dict(client.insecure), client.dev_refused(), now)

    return run(main)


def _hint_dev_refused(snap: Snapshot) -> None:
    if snap.dev_refused:
        err.print(f"[yellow]{snap.dev_refused} provider(s) run without a TEE (dev attestation) "
                  f"and are refused: {INSECURE_HINT}[/]")


def peers(
    bootstrap: BootstrapOpt = None, wait: WaitOpt = 2.0, insecure: InsecureOpt = False,
    json_out: JsonOpt = False, verbose: VerboseOpt = 0,
) -> None:
    """Join the mesh as a light client and list the providers it knows."""
    from meshnode.ops.views import advert_row

    setup_logging(verbose)
    snap = _directory_snapshot(bootstrap, insecure, wait)
    if json_out:
        rows = [advert_row(lst, snap.time) | {"insecure": snap.insecure.get(lst.peer_id, False)}
                for lst in snap.listings]
        print_json({"providers": rows, "dev_refused": snap.dev_refused})
        _hint_dev_refused(snap)
        return
    rows_text = []
    for lst in snap.listings:
        a = lst.advert
        rows_text.append([
            a.peer_id,
            printable(", ".join(m.name for m in a.models)),
            f"{a.load.busy_slots}/{a.capacity.slots} +{a.load.queue_len}",
            f"{a.capacity.tokens_per_s:.1f}",
            lst.verification.value + (" (no TEE)" if snap.insecure.get(a.peer_id) else ""),
            printable(lst.verification_reason),
            "\n".join(a.addrs),
        ])
    print_table(f"{len(snap.listings)} provider(s)",
                ["peer", "models", "load", "tok/s", "attestation", "reason", "addresses"],
                rows_text)
    _hint_dev_refused(snap)


def models(
    bootstrap: BootstrapOpt = None, wait: WaitOpt = 2.0, insecure: InsecureOpt = False,
    json_out: JsonOpt = False, verbose: VerboseOpt = 0,
) -> None:
    """Join the mesh as a light client and list the models it serves."""
    from dataclasses import asdict

    setup_logging(verbose)
    snap = _directory_snapshot(bootstrap, insecure, wait)
    if json_out:
        print_json({"models": [asdict(m) for m in snap.models],
                    "dev_refused": snap.dev_refused})
        _hint_dev_refused(snap)
        return
    print_table(
        f"{len(snap.models)} model(s)",
        ["name", "id", "quant", "ctx", "providers", "verified", "min price /1k (nTON)"],
        [[printable(m.name), m.id, printable(m.quant), str(m.ctx), str(m.providers),
          str(m.verified_providers),
          f"{m.min_price_prompt_per_1k} / {m.min_price_completion_per_1k}"]
         for m in snap.models],
    )
    _hint_dev_refused(snap)
