"""`meshnode earnings`: what clients have paid and still owe this provider, per channel."""

from __future__ import annotations

import typer

from meshnode.cli.channel import channel_rows_json, print_channel_rows
from meshnode.cli.common import (
    ChainOpt,
    HomeOpt,
    JsonOpt,
    NetworkConfigOpt,
    VerboseOpt,
    chain_choice,
    out,
    print_json,
    run,
    setup_logging,
)
from meshnode.identity import data_dir


def register(app: typer.Typer) -> None:
    app.command()(earnings)


def earnings(
    chain: ChainOpt = "local",
    network_config: NetworkConfigOpt = None,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """What clients owe and have paid this provider, per channel, and how to withdraw."""
    from meshnode.channel_ops import earnings as provider_earnings
    from meshnode.channel_ops import format_ton

    setup_logging(verbose)
    choice = chain_choice(chain, network_config)
    rows = run(lambda: provider_earnings(data_dir(home), choice))
    if json_out:
        print_json(channel_rows_json(rows, "client_key"))
        return
    print_channel_rows(f"{len(rows)} channel(s) to this provider", rows, "client key")
    open_rows = [r for r in rows if r.state == "open"]
    out.print(f"earned    {format_ton(sum(r.paid for r in rows))} in vouchers "
              f"({format_ton(sum(r.paid for r in open_rows))} in open channels)")
    out.print(f"unpaid    {format_ton(sum(r.debt for r in rows))} of debt (jobs that ended "
              "before their last voucher; the next job on the channel pays it first)")
    out.print("[dim]withdraw: a client's cooperative close pays the latest voucher straight "
              "to this node's wallet; a client that stays away can be closed unilaterally "
              "with the latest voucher (the running `serve` finishes closes and challenges "
              "stale ones).[/]")
