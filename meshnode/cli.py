"""`meshnode` command line: serve a model, ask a provider, or run the local demo."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import trio
import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from meshnode.identity import KeyFileError, data_dir, load_or_create

if TYPE_CHECKING:
    from meshnode.pay.chain_choice import ChainChoice

app = typer.Typer(
    help="meshnode: a peer-to-peer mesh for confidential LLM inference.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console(soft_wrap=True)  # addresses and ids must stay copy-pasteable
err = Console(stderr=True)
T = TypeVar("T")

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Data dir for keys and state (default $MESHNODE_HOME or XDG)."),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
BootstrapOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--bootstrap",
        help="Bootstrap peer multiaddr (repeatable; default: bootstrap/peers.toml).",
    ),
]
InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="Allow providers without a TEE (dev evidence).")
]
ChainOpt = Annotated[
    str,
    typer.Option(
        "--chain",
        help="TON chain for payments: 'local' (emulated, real contract code, state in "
        "$MESHNODE_CHAIN_STATE or ~/.cache/meshnode) or 'liteclient' (not in this build).",
    ),
]
NetworkConfigOpt = Annotated[
    Path | None,
    typer.Option("--network-config", help="TON global config for --chain liteclient."),
]


def _bootstrap(given: list[str] | None) -> list[str]:
    from meshnode.bootstrap_peers import BootstrapListError, load_bootstrap_peers

    if given:
        return given
    try:
        return load_bootstrap_peers()
    except BootstrapListError as exc:
        err.print(f"[red]bad bootstrap list:[/] {exc}")
        raise typer.Exit(2) from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(name)s: %(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )
    if not verbose:
        # py-libp2p logs routine connection chatter at INFO/WARNING; keep the user's view
        # to meshnode's own messages.
        logging.getLogger("libp2p").setLevel(logging.ERROR)
    logging.getLogger("meshnode").setLevel(logging.DEBUG if verbose else logging.INFO)


class _Terminated(Exception):
    """SIGTERM (systemd stop, docker stop, kill): shut down like Ctrl-C."""


async def _until_sigterm(fn: Callable[[], Awaitable[T]]) -> T:
    result: list[T] = []
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def body() -> None:
                result.append(await fn())
                nursery.cancel_scope.cancel()

            nursery.start_soon(body)
            async for _ in signals:
                nursery.cancel_scope.cancel()  # every task unwinds, hosts close cleanly
                break
    if not result:
        raise _Terminated
    return result[0]


def _run(fn: Callable[[], Awaitable[T]]) -> T:
    try:
        result: T = trio.run(_until_sigterm, fn)
        return result
    except _Terminated:
        err.print("[yellow]terminated[/]")
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except KeyFileError as exc:
        err.print(f"[red]key file problem:[/] {exc}")
        raise typer.Exit(2) from None


def _chain_choice(chain: str, network_config: Path | None) -> ChainChoice:
    from meshnode.pay.chain_choice import ChainChoice, ChainKind, ChainUnavailable

    try:
        choice = ChainChoice(ChainKind(chain.lower()), network_config)
        choice.check()
    except ValueError:
        err.print(f"[red]--chain must be 'local' or 'liteclient', not {chain!r}[/]")
        raise typer.Exit(2) from None
    except ChainUnavailable as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    return choice


def _channel_id(text: str) -> int:
    from meshnode.channel_ops import parse_channel_id

    try:
        return parse_channel_id(text)
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None


def _run_paying(fn: Callable[[], Awaitable[T]]) -> T:
    """`_run` for commands that touch channels: their errors become clear exits."""
    from meshnode.channel_ops import ChannelCommandError
    from meshnode.pay.channels import ChannelError
    from meshnode.pay.contract_code import ContractCodeError
    from meshnode.pay.emulator import EmulatorError
    from meshnode.pay.local_chain import LocalChainError
    from meshnode.pay.wallet_keys import PaymentKeyError

    try:
        return _run(fn)
    except BaseException as raised:
        # Errors inside a node's nursery arrive wrapped in (nested) exception groups.
        exc: BaseException = raised
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        if isinstance(exc, KeyboardInterrupt):
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None
        if isinstance(exc, ChannelCommandError):
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(exc.exit_code) from None
        if isinstance(exc, ChannelError):
            err.print(f"[red]channel error:[/] {exc}")
            raise typer.Exit(1) from None
        if isinstance(exc, EmulatorError):
            err.print(f"[red]the chain refused:[/] {exc}")
            raise typer.Exit(1) from None
        if isinstance(exc, (LocalChainError, PaymentKeyError, ContractCodeError, KeyFileError)):
            err.print(f"[red]{exc}[/]")
            raise typer.Exit(2) from None
        raise


async def _load_engine(path: Path, n_ctx: int, n_gpu_layers: int) -> Any:
    from meshnode.engine.llama import LlamaEngine

    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(stage: str, fraction: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(f"{stage} {path.name}", total=1.0)
            bar.update(tasks[stage], completed=fraction)

        return await LlamaEngine.load(
            path, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, progress=progress
        )


@app.command()
def serve(
    model: Annotated[Path, typer.Option("--model", help="GGUF file to serve.")],
    listen: Annotated[str, typer.Option(help="libp2p listen multiaddr.")] = (
        "/ip4/0.0.0.0/tcp/4001"
    ),
    ctx: Annotated[int, typer.Option("--ctx", help="Context length in tokens.")] = 4096,
    n_gpu_layers: Annotated[
        int, typer.Option("--n-gpu-layers", help="Layers on the GPU (-1: all; CUDA builds).")
    ] = 0,
    slots: Annotated[int, typer.Option(help="Jobs run at once.")] = 1,
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
    home: HomeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Serve a GGUF model to the mesh (prints the peer id and multiaddrs).

    `--listen none` accepts no inbound connection: give `--relay` to be reachable.
    With a price, clients pay per token over TON payment channels (`--chain`)."""
    from meshnode.channel_ops import DEFAULT_CREDIT_WINDOW_TOKENS, format_ton, provider_payments
    from meshnode.core.meter import Price
    from meshnode.node import ProviderSettings, provider_node

    _setup_logging(verbose)
    if price_prompt < 0 or price_completion < 0:
        err.print("[red]prices cannot be negative[/]")
        raise typer.Exit(2)
    priced = price_prompt > 0 or price_completion > 0
    chain = chain or ("local" if priced else "none")
    choice = None if chain.lower() == "none" else _chain_choice(chain, network_config)
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

    async def main() -> None:
        identity, created = load_or_create(data_dir(home))
        pay = None
        if choice is not None:
            pay = await provider_payments(
                data_dir(home), choice, Price(price_prompt, price_completion), window
            )
        engine = await _load_engine(model, ctx, n_gpu_layers)
        await engine.warm_up()
        settings = ProviderSettings(
            listen=None if listen.lower() == "none" else listen,
            bootstrap=tuple(_bootstrap(bootstrap)),
            relay=tuple(relay or ()),
            slots=slots,
            max_queue=queue,
            tee=tee,
            price_prompt_per_1k=price_prompt,
            price_completion_per_1k=price_completion,
            ton=pay.payee if pay is not None else None,
        )
        async with (
            provider_node(
                engine, identity=identity, settings=settings,
                gate_factory=pay.payments.gates if pay is not None else None,
            ) as node,
            trio.open_nursery() as nursery,
        ):
            if pay is not None:
                pay.payments.service.install(node.host)
                await nursery.start(pay.payments.watcher.run)
            out.print(f"[bold green]serving[/] {engine.info.name} ({engine.info.quant})")
            out.print(f"model id  {engine.info.model_id}")
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
            await trio.sleep_forever()

    _run_paying(main)


@app.command()
def ask(
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
    insecure: InsecureOpt = False,
    home: HomeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Send one prompt to a provider (--peer) or to the best provider of --model, and
    print the tokens as they arrive."""
    from meshnode.channel_ops import channel_payer, client_payments, format_ton
    from meshnode.jobs.client import JobError
    from meshnode.jobs.routed import NoProvider
    from meshnode.node import client_node
    from meshnode.pay.payer import ChannelPayer

    _setup_logging(verbose)
    if (peer is None) == (model is None):
        err.print("[red]give exactly one of --peer MULTIADDR or --model NAME[/]")
        raise typer.Exit(2)
    channel_id, choice = None, None
    if channel is not None:
        if peer is None:
            err.print("[red]--channel pays one provider: give it with --peer[/]")
            raise typer.Exit(2)
        channel_id, choice = _channel_id(channel), _chain_choice(chain, network_config)
    boot = _bootstrap(bootstrap) if model is not None else []
    if model is not None and not boot:
        err.print("[red]--model needs a bootstrap peer (--bootstrap or bootstrap/peers.toml)[/]")
        raise typer.Exit(2)
    params: dict[str, Any] = {"temperature": temperature}
    if seed is not None:
        params["seed"] = seed

    async def on_text(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    async def main() -> int:
        async with client_node(allow_insecure=insecure, bootstrap=boot) as client:
            try:
                if peer is not None:
                    try:
                        advert = await client.connect(peer)
                    except Exception as exc:  # libp2p raises its own dial errors
                        err.print(f"[red]cannot reach {peer}:[/] {type(exc).__name__}: {exc}")
                        return 3
                    payer: ChannelPayer | None = None
                    if channel_id is not None and choice is not None:
                        payments = client_payments(data_dir(home), choice)
                        payer = await channel_payer(payments, channel_id, advert)
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
                        total = payer.paid_for_job + payer.job_base
                        err.print(f"[dim]paid {format_ton(payer.paid_for_job)} in "
                                  f"{len(payer.vouchers)} voucher(s); channel total "
                                  f"{format_ton(total)}[/]")
                    used, usage, insecure_run = (
                        [advert.peer_id], res.usage, client.insecure.get(advert.peer_id, True)
                    )
                    ttft, elapsed = res.ttft_s, res.elapsed_s
                else:
                    assert model is not None
                    routed = await client.complete(model, prompt, max_tokens=max_tokens,
                                                   params=params, on_text=on_text)
                    used, usage = routed.providers, routed.usage
                    insecure_run = client.ran_insecure(routed)
                    ttft, elapsed = routed.ttft_s, routed.elapsed_s
            except PermissionError as exc:
                err.print(f"[red]refused:[/] {exc} (--insecure allows dev providers)")
                return 5
            except NoProvider as exc:
                err.print(f"[red]no provider:[/] {exc}")
                return 6
            except JobError as exc:
                err.print(f"\n[red]job failed:[/] {exc}")
                return 4
        sys.stdout.write("\n")
        if insecure_run:
            err.print("[yellow]this answer ran WITHOUT a TEE (dev provider): the provider "
                      "could read the prompt[/]")
        err.print(
            f"[dim]{usage.completion_tokens} tokens from {', '.join(p[-8:] for p in used)}, "
            f"first after {ttft * 1000:.0f} ms, {elapsed:.2f} s total, "
            f"finish: {usage.finish_reason}[/]"
        )
        return 0

    raise typer.Exit(_run_paying(main))


@app.command()
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
    insecure: InsecureOpt = False,
    home: HomeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a light client with an OpenAI-compatible endpoint on loopback."""
    from meshnode.api.backend import RoutedBackend
    from meshnode.api.server import BindRefused, check_bind, parse_listen, serve_api
    from meshnode.core.router import Strategy
    from meshnode.node import client_node

    _setup_logging(verbose)
    try:
        api_host, api_port = parse_listen(api)
        check_bind(api_host, allow_remote=allow_remote, api_key=api_key)
        chosen = Strategy(strategy)
    except (ValueError, BindRefused) as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None

    async def main() -> None:
        stats = data_dir(home) / "client" / "peer-stats.json"
        async with client_node(
            allow_insecure=insecure, strategy=chosen, stats_path=stats,
            bootstrap=_bootstrap(bootstrap),
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
            out.print(f"[bold green]OpenAI-compatible API[/] at {url}/v1")
            if insecure:
                out.print("[yellow]--insecure: answers may come from providers without a TEE[/]")

    _run(main)


@app.command()
def demo(
    prompt: Annotated[str, typer.Option(help="What to ask.")] = (
        "Why is the sky blue? Explain in two sentences."
    ),
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 64,
    tiny: Annotated[bool, typer.Option(help="Use the generated tiny model.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """A provider and a light client on loopback, streaming one answer end to end."""
    _setup_logging(verbose)
    if not verbose:
        logging.getLogger("meshnode").setLevel(logging.WARNING)  # keep the answer readable
    from meshnode.demo import run_demo

    raise typer.Exit(_run(lambda: run_demo(out, err, prompt, max_tokens, tiny)))


@app.command()
def attest(home: HomeOpt = None, verbose: VerboseOpt = False) -> None:
    """Print this node's attestation evidence and the binding of its keys."""
    import time

    from meshnode.attest.local import describe_local_evidence
    from meshnode.core.attest_binding import epoch_at

    _setup_logging(verbose)
    try:
        identity, _ = load_or_create(data_dir(home))
    except KeyFileError as exc:
        err.print(f"[red]key file problem:[/] {exc}")
        raise typer.Exit(2) from None
    now = time.time()
    report = describe_local_evidence(identity.job_public, identity.peer_public, now)
    out.print(f"peer public key  {identity.peer_public.hex()}")
    out.print(f"job public key   {identity.job_public.hex()}")
    out.print(f"epoch            {epoch_at(now)}")
    if report.report_data is not None:
        out.print(f"report_data      {report.report_data.hex()}")
    state = "available" if report.available else "unavailable"
    out.print(f"evidence         {report.kind} ({state})")
    out.print(report.detail)
    if report.measurements:
        out.print("\n# paste into the attestation policy to allow this image:")
        out.print(report.policy_snippet(), markup=False)
    raise typer.Exit(0 if report.available else 1)


@app.command("verify-quote")
def verify_quote(
    quote: Annotated[Path, typer.Argument(help="Raw DCAP quote file.")],
    collateral: Annotated[Path, typer.Option("--collateral", help="Collateral JSON.")],
    at: Annotated[
        str | None, typer.Option("--at", help="Verify as of this ISO time (default: now).")
    ] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Also apply this policy file's rules.")
    ] = None,
) -> None:
    """Verify a TDX/SGX quote with dcap-qvl and print the verified claims."""
    import json
    from datetime import datetime

    from meshnode.attest.local import verify_quote_file
    from meshnode.attest.policy_file import load_policy

    when = None
    if at is not None:
        try:
            when = datetime.fromisoformat(at)
        except ValueError:
            err.print(f"[red]--at must be an ISO time such as 2025-06-01T12:00:00+00:00[/]: {at}")
            raise typer.Exit(2) from None
        if when.tzinfo is None:
            err.print("[red]--at needs a timezone, e.g. +00:00[/]")
            raise typer.Exit(2)
    try:
        claims = verify_quote_file(
            quote, collateral, when, policy=load_policy(policy) if policy else None
        )
    except FileNotFoundError as exc:
        err.print(f"[red]file not found:[/] {exc.filename}")
        raise typer.Exit(2) from None
    except Exception as exc:  # AttestationError/CollateralError carry their reason
        err.print(f"[red]verification failed:[/] {exc}")
        raise typer.Exit(1) from None
    out.print_json(json.dumps(claims.to_dict()))



def _directory_snapshot(
    bootstrap: list[str] | None, insecure: bool, wait_s: float
) -> tuple[list[Any], list[Any], dict[str, bool]]:
    from meshnode.node import client_node

    boot = _bootstrap(bootstrap)
    if not boot:
        err.print("[red]no bootstrap peers (--bootstrap or bootstrap/peers.toml)[/]")
        raise typer.Exit(2)

    async def main() -> tuple[list[Any], list[Any], dict[str, bool]]:
        import time

        async with client_node(allow_insecure=insecure, bootstrap=boot) as client:
            await trio.sleep(wait_s)  # gossip brings whatever the snapshot missed
            await client.verify_pending()
            now = time.time()
            return client.directory.peers(now), client.directory.models(now), client.insecure

    result: tuple[list[Any], list[Any], dict[str, bool]] = _run(main)
    return result


WaitOpt = Annotated[float, typer.Option("--wait", help="Seconds to listen to gossip first.")]


@app.command()
def peers(
    bootstrap: BootstrapOpt = None, wait: WaitOpt = 2.0, insecure: InsecureOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Join the mesh as a light client and list the providers it knows."""
    from rich.table import Table

    _setup_logging(verbose)
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


@app.command()
def models(
    bootstrap: BootstrapOpt = None, wait: WaitOpt = 2.0, insecure: InsecureOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Join the mesh as a light client and list the models it serves."""
    from rich.table import Table

    _setup_logging(verbose)
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


@app.command("bootstrap")
def bootstrap_cmd(
    listen: Annotated[str, typer.Option(help="libp2p listen multiaddr.")] = (
        "/ip4/0.0.0.0/tcp/4001"
    ),
    peer: Annotated[
        list[str] | None, typer.Option("--peer", help="Other bootstrap nodes to join.")
    ] = None,
    no_relay: Annotated[bool, typer.Option("--no-relay", help="Do not relay.")] = False,
    home: HomeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a bootstrap node: DHT server, advert gossip, circuit relay; serves no model."""
    from meshnode.p2p.discovery import BootstrapNode
    from meshnode.p2p.host import full_addrs, running_host

    _setup_logging(verbose)

    async def main() -> None:
        identity, _ = load_or_create(data_dir(home))
        async with running_host(identity, listen) as host, trio.open_nursery() as nursery:
            node = BootstrapNode(host, peer or [], relay=not no_relay)
            await nursery.start(node.run)
            out.print("[bold green]bootstrap node up[/] (DHT server, gossip"
                      + ("" if no_relay else ", relay") + ")")
            for addr in full_addrs(host):
                out.print(f"join with --bootstrap {addr}")

    _run(main)


@app.command()
def testnet(
    providers: Annotated[int, typer.Option("--providers", help="How many providers.")] = 3,
    models_: Annotated[
        int, typer.Option("--models", help="Distinct tiny models among them.")
    ] = 2,
    model: Annotated[
        Path | None, typer.Option("--model", help="Serve this GGUF on every provider instead.")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """A local mesh on loopback: one bootstrap node and N providers, until Ctrl-C."""
    from contextlib import AsyncExitStack

    from meshnode.engine.llama import LlamaEngine
    from meshnode.engine.tinymodel import write_tiny_llama
    from meshnode.identity import NodeIdentity
    from meshnode.node import ProviderSettings, provider_node
    from meshnode.p2p.discovery import BootstrapNode
    from meshnode.p2p.host import full_addrs, running_host

    _setup_logging(verbose)
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
                engine = await LlamaEngine.load(path, n_ctx=512 if model is None else 4096)
                stack.push_async_callback(engine.aclose)
                node = await stack.enter_async_context(provider_node(
                    engine, identity=NodeIdentity.generate(),
                    settings=ProviderSettings(bootstrap=(boot,)),
                ))
                out.print(f"provider {i}: {engine.info.name} {node.peer_id}")
            out.print(f"[bold green]testnet up[/]: join with --bootstrap {boot}")
            out.print("[yellow]providers use dev attestation: clients need --insecure[/]")
            await trio.sleep_forever()

    _run(main)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def lab(ctx: typer.Context) -> None:
    """Routing lab: `meshnode lab sim|sweep|profile|real SCENARIO.toml [--options]`.

    Same as `python -m meshnode.lab ...`; see the README's "Routing lab" section."""
    from meshnode.lab.__main__ import main as lab_main

    raise typer.Exit(lab_main(list(ctx.args)))


channel_app = typer.Typer(
    help="TON payment channels from this node (the client) to providers.",
    no_args_is_help=True,
)
app.add_typer(channel_app, name="channel")
ChannelIdArg = Annotated[str, typer.Argument(help="Channel id as printed by `channel open`.")]
PeerOpt = Annotated[str, typer.Option("--peer", help="Provider multiaddr with /p2p/ID.")]


@channel_app.command("open")
def channel_open(
    peer: PeerOpt,
    deposit: Annotated[str, typer.Option("--deposit", help="TON to lock in the channel.")],
    chain: ChainOpt = "local",
    network_config: NetworkConfigOpt = None,
    insecure: InsecureOpt = False,
    home: HomeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Open a channel to a provider: deploy it with the deposit, init it, announce it."""
    from meshnode.channel_ops import format_ton, open_paid_channel, parse_ton
    from meshnode.pay.onchain import raw_address

    _setup_logging(verbose)
    try:
        amount = parse_ton(deposit)
    except ValueError as exc:
        err.print(f"[red]--deposit: {exc}[/]")
        raise typer.Exit(2) from None
    choice = _chain_choice(chain, network_config)
    opened = _run_paying(
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


@channel_app.command("status")
def channel_status(
    channel_id: ChannelIdArg,
    chain: ChainOpt = "local",
    network_config: NetworkConfigOpt = None,
    home: HomeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """What the chain and this node's ledger say about one channel."""
    from rich.table import Table

    from meshnode.channel_ops import format_ton, read_status, state_name
    from meshnode.pay.onchain import raw_address

    _setup_logging(verbose)
    cid = _channel_id(channel_id)
    choice = _chain_choice(chain, network_config)
    status = _run_paying(lambda: read_status(data_dir(home), choice, cid))
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


@channel_app.command("close")
def channel_close(
    channel_id: ChannelIdArg,
    peer: PeerOpt,
    chain: ChainOpt = "local",
    network_config: NetworkConfigOpt = None,
    home: HomeOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Close cooperatively: the provider co-signs a split paying exactly the last voucher."""
    from meshnode.channel_ops import close_paid_channel, format_ton, state_name
    from meshnode.pay.onchain import raw_address

    _setup_logging(verbose)
    cid = _channel_id(channel_id)
    choice = _chain_choice(chain, network_config)
    closed = _run_paying(lambda: close_paid_channel(data_dir(home), choice, cid, peer))
    out.print(f"[bold green]closed[/]   {cid:#x} cooperatively "
              f"(state now: {state_name(closed.status.state)})")
    out.print(f"paid     {format_ton(closed.paid_to_provider)} to provider wallet "
              f"{raw_address(closed.provider_wallet)} (voucher seqno {closed.paid_seqno})")
    out.print(f"refunded {format_ton(closed.refunded)} to this node's wallet "
              "(rest of the deposit + fee reserve)")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
