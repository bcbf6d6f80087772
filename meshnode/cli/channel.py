"""`meshnode channel open|status|close`: TON payment channels to providers."""

from __future__ import annotations

from typing import Annotated

import typer

from meshnode.cli.common import (
    ChainOpt,
    HomeOpt,
    InsecureOpt,
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
    group = typer.Typer(
        help="TON payment channels from this node (the client) to providers.",
        no_args_is_help=True,
    )
    group.command("open")(channel_open)
    group.command("status")(channel_status)
    group.command("close")(channel_close)
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
    from meshnode.pay.onchain import raw_address

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
    from meshnode.pay.onchain import raw_address

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
    from meshnode.pay.onchain import raw_address

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
