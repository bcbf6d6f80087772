"""`meshnode earnings`: what clients have paid and still owe this provider, per channel."""

from __future__ import annotations

from typing import Annotated

import typer

from meshnode.cli.channel import channel_rows_json, print_channel_rows
from meshnode.cli.common import (
    ChainOpt,
    HomeOpt,
    JsonOpt,
    NetworkConfigOpt,
    VerboseOpt,
    chain_choice,
    err,
    out,
    parse_channel_arg,
    print_json,
    run,
    setup_logging,
)
from meshnode.identity import data_dir


def register(app: typer.Typer) -> None:
    app.command()(earnings)


def earnings(
    withdraw: Annotated[
        str | None,
        typer.Option("--withdraw", metavar="CHANNEL",
                     help="A client that stays away: start closing this channel on chain "
                     "with its latest voucher; run again after the quarantine to collect "
                     "(a running `serve` collects by itself)."),
    ] = None,
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
    if withdraw is not None:
        from meshnode.channel_ops import withdraw as start_withdrawal

        cid = parse_channel_arg(withdraw)
        started, finished = run(lambda: start_withdrawal(data_dir(home), choice, cid))
        say = err.print if json_out else out.print  # --json keeps stdout one document
        if started is not None:
            say(f"channel {cid:#x}: closing started on chain; it will pay "
                      f"{format_ton(started)} once the quarantine is over")
        if finished:
            say(f"channel {cid:#x}: close finished, paid to this node's wallet")
        elif started is None:
            say(f"channel {cid:#x}: closing, still in quarantine (or already closed)")
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
              "to this node's wallet; from a client that stays away, `meshnode earnings "
              "--withdraw CHANNEL` starts closing with the latest voucher and collects "
              "after the quarantine (a running `serve` collects by itself and challenges "
              "stale closes).[/]")
