"""`meshnode ask` and `meshnode client`: the light client's commands.

`ask` has two paths. Warm (cli/ask_warm.py, mostly answered before typer even loads): a
`meshnode client` is running on this --home (cli/local_client.py), so `ask --model`
streams from its API, importing no libp2p. Cold: `ask` runs its own light client node for
this one answer. Module-level imports stay light: everything the cold path or `client`
needs is imported inside them.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape as markup_escape

from meshnode.cli import ask_warm
from meshnode.cli.ask_warm import (
    OWN_NODE_OPTIONS,
    ask_through_client,
    note,
    print_summary,
    shown_text,
    warm_choice,
)
from meshnode.cli.common import (
    INSECURE_HINT,
    BootstrapOpt,
    BudgetOpt,
    ChainOpt,
    DepositOpt,
    HomeOpt,
    IdleCloseOpt,
    InsecureOpt,
    MetricsOpt,
    NetworkConfigOpt,
    RemoteMetricsOpt,
    VerboseOpt,
    bootstrap_addrs,
    chain_choice,
    err,
    metrics_bind,
    out,
    parse_channel_arg,
    print_ops,
    routed_budget,
    run,
    setup_logging,
)
from meshnode.core.text import for_terminal
from meshnode.identity import data_dir

if TYPE_CHECKING:
    from meshnode.pay.metering.payer import ChannelPayer

# How often the client looks for providers it refused for running without a TEE.
DEV_REFUSED_CHECK_S = 5.0


async def warn_dev_refused(node: Any) -> None:
    """Say once, when it happens, that dev providers exist but are refused: otherwise
    the API just lists no models and the user cannot tell why."""
    import trio

    while True:
        refused = node.dev_refused()
        if refused:
            err.print(f"[yellow]{refused} provider(s) run without a TEE (dev attestation) and "
                      f"are refused: the API does not list their models; {INSECURE_HINT}[/]")
            return
        await trio.sleep(DEV_REFUSED_CHECK_S)


def exit_now(code: int) -> None:
    """End the process at once, after flushing what the user is owed: the output and
    the log. Only for a client with no state to persist (no channels, no peer stats):
    what it skips is closing libp2p connections, which the kernel does at exit."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def register(app: typer.Typer) -> None:
    app.command()(ask)
    app.command()(client)


# Where an option's value may come from and still leave the warm path open: the client
# started from the same shell reads the same MESHNODE_DEPOSIT / MESHNODE_BUDGET.
SHARED_SOURCES = frozenset({"DEFAULT", "ENVIRONMENT"})


def given_options(ctx: typer.Context) -> set[str]:
    """The node-configuring options set on the command line (see ask_warm)."""
    given = set()
    for name in OWN_NODE_OPTIONS:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name not in SHARED_SOURCES:
            given.add(name)
    return given


def ask(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="The prompt to send (raw completion text).")],
    peer: Annotated[
        str | None, typer.Option("--peer", help="Provider multiaddr with /p2p/ID.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Model name or id: found through the mesh.")
    ] = None,
    bootstrap: BootstrapOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 128,
    temperature: Annotated[float, typer.Option()] = 0.7,
    seed: Annotated[int | None, typer.Option()] = None,
    channel: Annotated[
        str | None,
        typer.Option("--channel", help="Pay with this channel (from `channel open`; --peer)."),
    ] = None,
    chain: ChainOpt = "local",
    network_config: NetworkConfigOpt = None,
    deposit: DepositOpt = "0.1",
    budget: BudgetOpt = "1",
    insecure: InsecureOpt = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the answer and its usage as one JSON object.")
    ] = False,
    own_node: Annotated[
        bool, typer.Option("--own-node", help="Run a node of its own even when a "
                           "`meshnode client` is running on this --home.")
    ] = False,
    home: HomeOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Send one prompt to a provider (--peer) or to the best provider of --model, and
    print the tokens as they arrive (with --json: one JSON object at the end). With
    --model, priced providers are paid through channels opened on first use (within
    --deposit and --budget) and reused. With --model and a `meshnode client` running on
    this --home, the prompt goes through that client (fast: no node to start).

    The provider's text is shown with its terminal control characters escaped (an
    untrusted provider must not drive the user's terminal); --json and the API keep them
    as sent (JSON escapes them, so the JSON itself is still safe to print).
    """
    setup_logging(verbose)
    if (peer is None) == (model is None):
        err.print("[red]give exactly one of --peer MULTIADDR or --model NAME[/]")
        raise typer.Exit(2)
    params: dict[str, Any] = {"temperature": temperature}
    if seed is not None:
        params["seed"] = seed
    state = warm_choice(model=model, insecure=insecure, own_node=own_node,
                        given=given_options(ctx), home=home)
    if not isinstance(state, str):  # a client appeared after the pre-typer look
        assert model is not None
        code = ask_through_client(state, model, prompt, max_tokens=max_tokens, params=params,
                                  json_out=json_out, verbose=verbose)
        if code is not None:
            exit_now(code)
        state = ask_warm.declined or "the running client could not take it"
    note(verbose, f"path: own node ({state})")
    # Only what every cold ask needs is imported here: the first token is waiting on it.
    # Payments (TON cells, the channel ledger) load only when a channel or --model asks.
    from meshnode.jobs.client import JobError
    from meshnode.jobs.routed import NoProvider
    from meshnode.node import client_node

    channel_id, choice = None, None
    if channel is not None:
        if peer is None:
            err.print("[red]--channel pays one provider: give it with --peer[/]")
            raise typer.Exit(2)
        channel_id, choice = parse_channel_arg(channel), chain_choice(chain, network_config)
    boot = bootstrap_addrs(bootstrap) if model is not None else []
    if model is not None and not boot:
        err.print("[red]--model needs a bootstrap peer (--bootstrap, or entries in the "
                  "packaged peers.toml)[/]")
        raise typer.Exit(2)
    limits = None
    if model is not None:
        from meshnode.pay.channel.pool import DEFAULT_IDLE_CLOSE_S

        limits = routed_budget(deposit, budget, DEFAULT_IDLE_CLOSE_S)
        choice = chain_choice(chain, network_config)

    async def on_text(text: str) -> None:
        if json_out:
            return  # the whole text goes out once, unescaped, inside the JSON
        sys.stdout.write(for_terminal(text))
        sys.stdout.flush()

    def summary(text: str, used: list[str], usage: Any, insecure_run: bool, ttft: float,
                elapsed: float) -> None:
        print_summary(text, used, insecure_run, finish_reason=usage.finish_reason,
                      prompt_tokens=usage.prompt_tokens,
                      completion_tokens=usage.completion_tokens,
                      cost_nanoton=usage.cost_nanoton, ttft=ttft, elapsed=elapsed,
                      json_out=json_out)

    async def main() -> int:
        channels = None
        if limits is not None and choice is not None:
            from meshnode.channel_ops import routed_payments

            channels = routed_payments(data_dir(home), choice, limits)
        payer: ChannelPayer | None = None
        async with client_node(allow_insecure=insecure, bootstrap=boot,
                               payments=channels) as client:
            try:
                if peer is not None:
                    try:
                        advert = await client.connect(peer)
                    except Exception as exc:  # libp2p raises its own dial errors
                        err.print(f"[red]cannot reach {markup_escape(peer)}:[/] "
                                  f"{type(exc).__name__}: {shown_text(exc)}")
                        return 3
                    if channel_id is not None and choice is not None:
                        from meshnode.channel_ops import channel_payer, client_payments

                        payer = await channel_payer(
                            client_payments(data_dir(home), choice), channel_id, advert)
                    try:
                        res = await client.ask(advert, prompt, max_tokens=max_tokens,
                                               params=params, on_text=on_text, payer=payer)
                    except JobError:
                        if payer is None and any(
                            m.price_prompt_per_1k or m.price_completion_per_1k
                            for m in advert.models
                        ):
                            err.print("\n[yellow]this provider charges per token: open a "
                                      "channel (meshnode channel open) and pass --channel[/]")
                        raise
                    if payer is not None:
                        from meshnode.channel_ops import format_ton

                        total = payer.paid_for_job + payer.job_base
                        err.print(f"[dim]paid {format_ton(payer.paid_for_job)} in "
                                  f"{len(payer.vouchers)} voucher(s); channel total "
                                  f"{format_ton(total)}[/]")
                    used, usage, insecure_run = (
                        [advert.peer_id], res.usage, client.insecure.get(advert.peer_id, True)
                    )
                    ttft, elapsed, text = res.ttft_s, res.elapsed_s, res.text
                else:
                    assert model is not None
                    routed = await client.complete(model, prompt, max_tokens=max_tokens,
                                                   params=params, on_text=on_text)
                    used, usage = routed.providers, routed.usage
                    insecure_run = client.ran_insecure(routed)
                    if usage.cost_nanoton:
                        from meshnode.channel_ops import format_ton

                        err.print(f"[dim]paid {format_ton(usage.cost_nanoton)} by voucher[/]")
                    ttft, elapsed, text = routed.ttft_s, routed.elapsed_s, routed.text
            except PermissionError as exc:
                err.print(f"[red]refused:[/] {shown_text(exc)} (--insecure allows dev providers)")
                return 5
            except NoProvider as exc:
                err.print(f"[red]no provider:[/] {shown_text(exc)}")
                return 6
            except JobError as exc:
                err.print(f"\n[red]job failed:[/] {shown_text(exc)}")
                return 4
            summary(text, used, usage, insecure_run, ttft, elapsed)
            if channels is None and payer is None:
                # Nothing left to save: skip closing the host's connections one by one
                # (0.85 s after the last token); the kernel closes the sockets at exit.
                exit_now(0)
        return 0

    raise typer.Exit(run(main))


def client(
    peer: Annotated[
        list[str] | None, typer.Option("--peer", help="Provider multiaddr (repeatable).")
    ] = None,
    api: Annotated[
        str, typer.Option("--api", help="Serve the OpenAI-compatible API on HOST:PORT.")
    ] = "127.0.0.1:8080",
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="MESHNODE_API_KEY", help="Require this bearer key."),
    ] = None,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Allow a non-loopback bind (needs a key).")
    ] = False,
    strategy: Annotated[
        str, typer.Option(help="random|round_robin|least_loaded|p2c|cheapest|fastest")
    ] = "p2c",
    bootstrap: BootstrapOpt = None,
    chain: ChainOpt = "local",
    network_config: NetworkConfigOpt = None,
    deposit: DepositOpt = "0.1",
    budget: BudgetOpt = "1",
    idle_close: IdleCloseOpt = 24 * 3600.0,
    insecure: InsecureOpt = False,
    metrics: MetricsOpt = None,
    allow_remote_metrics: RemoteMetricsOpt = False,
    home: HomeOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Run a light client with an OpenAI-compatible endpoint on loopback. Priced
    providers are paid through channels opened on first use, within --deposit and
    --budget, reused across restarts and closed after --idle-close seconds unused."""
    from functools import partial

    import trio

    from meshnode.api.backend import RoutedBackend
    from meshnode.api.server import BindRefused, check_bind, parse_listen, serve_api
    from meshnode.channel_ops import format_ton, routed_payments
    from meshnode.cli.local_client import ClientState, remove_state, write_state
    from meshnode.core.router import Strategy
    from meshnode.node import client_node
    from meshnode.ops.service import start_ops
    from meshnode.ops.views import ClientView

    setup_logging(verbose)
    metrics_at = metrics_bind(metrics, allow_remote_metrics)
    try:
        api_host, api_port = parse_listen(api)
        check_bind(api_host, allow_remote=allow_remote, api_key=api_key)
        chosen = Strategy(strategy)
    except (ValueError, BindRefused) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    limits = routed_budget(deposit, budget, idle_close)
    choice = chain_choice(chain, network_config)

    async def main() -> None:
        try:
            await serve_client()
        finally:
            remove_state(data_dir(home), os.getpid())  # only if it is still ours

    async def serve_client() -> None:
        stats = data_dir(home) / "client" / "peer-stats.json"
        async with client_node(
            allow_insecure=insecure, strategy=chosen, stats_path=stats,
            bootstrap=bootstrap_addrs(bootstrap),
            payments=routed_payments(data_dir(home), choice, limits),
        ) as node, trio.open_nursery() as nursery:
            for addr in peer or []:
                try:
                    advert = await node.connect(addr)
                except Exception as exc:  # one bad address must not stop the client
                    err.print(f"[red]cannot use {addr}:[/] {type(exc).__name__}: {exc}")
                    continue
                out.print(f"provider {advert.peer_id}: {node.verification(advert.peer_id)}")
            url = await nursery.start(
                partial(serve_api, RoutedBackend(node), api_host, api_port,
                        api_key=api_key, allow_remote=allow_remote)
            )
            # Lets `ask` on this --home stream through us (the warm path); removed on exit.
            write_state(data_dir(home), ClientState(
                url=url, pid=os.getpid(), insecure=insecure, api_key=api_key))
            out.print(f"[bold green]OpenAI-compatible API[/] at {url}/v1")
            out.print(f"payments  channels of {format_ton(limits.deposit)} each, budget "
                      f"{format_ton(limits.total)} on the {choice.kind} chain")
            if insecure:
                out.print("[yellow]--insecure: answers may come from providers without a TEE[/]")
            print_ops(await start_ops(nursery, ClientView(node), home=data_dir(home),
                                      metrics=metrics_at), home)
            if not insecure:
                nursery.start_soon(warn_dev_refused, node)

    run(main)
