"""`meshnode channel open|status|close|list|close-all`: TON payment channels to
providers, opened by hand (`channel open`) or by routed jobs (`ask --model`, `client`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import typer

from meshnode.cli.common import (
    BootstrapOpt,
    ChainOpt,
    HomeOpt,
    InsecureOpt,
    JsonOpt,
    NetworkConfigOpt,
    VerboseOpt,
    bootstrap_addrs,
    chain_choice,
    err,
    out,
    parse_channel_arg,
    print_json,
    run,
    setup_logging,
)
from meshnode.cli.tables import print_table
from meshnode.identity import data_dir


def register(app: typer.Typer) -> None:
    group = typer.Typer(
        help="TON payment channels from this node (the client) to providers.",
        no_args_is_help=True,
    )
    group.command("open")(channel_open)
    group.command("status")(channel_status)
    group.command("close")(channel_close)
    group.command("list")(channel_list)
    group.command("close-all")(channel_close_all)
    app.add_typer(group, name="channel")


ChannelIdArg = Annotated[str, typer.Argument(help="Channel id as printed by `channel open`.")]
PeerOpt = Annotated[str, typer.Option("--peer", help="Provider multiaddr with /p2p/ID.")]


def channel_open(
    peer: PeerOpt,
    deposit: Annotated[str, typer.Option("--deposit", help="TON to lock in the channel.")],
    chain: ChainOpt = "local",
    network_config: NetworkConfigOpt = None,
    insecure: InsecureOpt = False,
    home: HomeOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Open a channel to a provider: deploy it with the deposit, init it, announce it."""
    from meshnode.channel_ops import format_ton, open_paid_channel, parse_ton
    from meshnode.pay.ton.onchain import raw_address

    setup_logging(verbose)
    try:
        amount = parse_ton(deposit)
    except ValueError as exc:
        err.print(f"[red]--deposit: {exc}[/]")
        raise typer.Exit(2) from None
    choice = chain_choice(chain, network_config)
    opened = run(
        lambda: open_paid_channel(data_dir(home), choice, peer, amount, insecure=insecure)
    )
    if opened.funded:
        out.print(f"[yellow]funded[/]   {format_ton(opened.funded)} into local wallet "
                  f"{raw_address(opened.wallet)} from the local-chain faucet (dev chain: "
                  "not real TON)")
    out.print(f"[bold green]channel[/]  {opened.channel_id:#x}")
    out.print(f"address  {raw_address(opened.address)}")
    out.print(f"deposit  {format_ton(opened.deposit)}")
    out.print(f"provider {opened.provider_peer_id} (wallet {raw_address(opened.provider_wallet)})")


def channel_status(
    channel_id: ChannelIdArg,
    chain: ChainOpt = "local",
    network_config: NetworkConfigOpt = None,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """What the chain and this node's ledger say about one channel."""
    from rich.table import Table

    from meshnode.channel_ops import format_ton, read_status, state_name
    from meshnode.pay.ton.onchain import raw_address

    setup_logging(verbose)
    cid = parse_channel_arg(channel_id)
    choice = chain_choice(chain, network_config)
    status = run(lambda: read_status(data_dir(home), choice, cid))
    if json_out:
        print_json({
            "channel_id": f"{cid:#x}", "address": raw_address(status.address),
            "state": state_name(status.state), "deposit_nanoton": status.deposit,
            "balance_a_nanoton": status.balance_a, "balance_b_nanoton": status.balance_b,
            "paid_seqno": status.paid_seqno, "paid_sent_nanoton": status.paid_sent,
            "quarantine_seqno_a": status.quarantine_seqno_a,
        })
        return
    out.print(f"channel {cid:#x} at {raw_address(status.address)}")
    table = Table(show_header=False)
    table.add_column("field")
    table.add_column("value")
    table.add_row("state", state_name(status.state))
    table.add_row("deposit", format_ton(status.deposit))
    table.add_row("on-chain balance A (client)", format_ton(status.balance_a))
    table.add_row("on-chain balance B (provider)", format_ton(status.balance_b))
    table.add_row("latest voucher seqno", str(status.paid_seqno))
    table.add_row("latest voucher sent", format_ton(status.paid_sent))
    if status.quarantine_seqno_a is not None:
        table.add_row("quarantined seqno", str(status.quarantine_seqno_a))
    out.print(table)


def channel_close(
    channel_id: ChannelIdArg,
    peer: PeerOpt,
    chain: ChainOpt = "local",
    network_config: NetworkConfigOpt = None,
    home: HomeOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Close cooperatively: the provider co-signs a split paying exactly the last voucher."""
    from meshnode.channel_ops import close_paid_channel, format_ton, state_name
    from meshnode.pay.ton.onchain import raw_address

    setup_logging(verbose)
    cid = parse_channel_arg(channel_id)
    choice = chain_choice(chain, network_config)
    closed = run(lambda: close_paid_channel(data_dir(home), choice, cid, peer))
    out.print(f"[bold green]closed[/]   {cid:#x} cooperatively "
              f"(state now: {state_name(closed.status.state)})")
    out.print(f"paid     {format_ton(closed.paid_to_provider)} to provider wallet "
              f"{raw_address(closed.provider_wallet)} (voucher seqno {closed.paid_seqno})")
    out.print(f"refunded {format_ton(closed.refunded)} to this node's wallet "
              "(rest of the deposit + fee reserve)")


# --- channels of routed jobs (and provider earnings, which lists them the same way) ---


def print_channel_rows(title: str, rows: Sequence[Any], counterparty: str) -> None:
    """`channel_ops.ChannelRow`s as a table that never cuts an id or a key."""
    from meshnode.channel_ops import format_ton

    print_table(
        title,
        ["channel", "state", counterparty, "deposit", "paid (latest voucher)", "unpaid debt",
         "jobs", "tokens"],
        [[f"{r.channel_id:#x}", r.state, r.counterparty, format_ton(r.deposit),
          format_ton(r.paid), format_ton(r.debt), str(r.jobs), str(r.completion_tokens)]
         for r in rows],
    )


def channel_rows_json(rows: Sequence[Any], counterparty: str) -> list[dict[str, Any]]:
    return [{"channel_id": f"{r.channel_id:#x}", "address": r.address, "state": r.state,
             counterparty: r.counterparty, "deposit_nanoton": r.deposit,
             "paid_nanoton": r.paid, "owed_nanoton": r.owed, "debt_nanoton": r.debt,
             "jobs": r.jobs, "completion_tokens": r.completion_tokens} for r in rows]


def channel_list(
    chain: ChainOpt = "local",
    network_config: NetworkConfigOpt = None,
    home: HomeOpt = None,
    json_out: JsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Every channel this node opened (by `channel open` or by routed jobs)."""
    from meshnode.channel_ops import list_channels

    setup_logging(verbose)
    choice = chain_choice(chain, network_config)
    rows = run(lambda: list_channels(data_dir(home), choice))
    if json_out:
        print_json(channel_rows_json(rows, "provider"))
        return
    print_channel_rows(f"{len(rows)} channel(s)", rows, "provider")


def channel_close_all(
    bootstrap: BootstrapOpt = None,
    peer: Annotated[
        list[str] | None, typer.Option("--peer", help="Provider multiaddr (repeatable).")
    ] = None,
    chain: ChainOpt = "local",
    network_config: NetworkConfigOpt = None,
    insecure: InsecureOpt = False,
    home: HomeOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Close every open channel cooperatively, paying each provider its last voucher
    (and any debt a broken job left). Providers are found through the mesh."""
    from meshnode.channel_ops import close_all_channels

    setup_logging(verbose)
    choice = chain_choice(chain, network_config)
    boot = bootstrap_addrs(bootstrap) if peer is None else list(bootstrap or [])
    closed, left = run(lambda: close_all_channels(
        data_dir(home), choice, boot, list(peer or []), insecure=insecure))
    for cid in closed:
        out.print(f"[bold green]closed[/] {cid:#x}")
    for cid in left:
        out.print(f"[yellow]still open[/] {cid:#x} (provider unreachable; try again later)")
    raise typer.Exit(0 if not left else 1)
