"""What every command shares: the consoles, option types, logging levels, and `run`.

`run` is the one place a command's trio code is started. It turns Ctrl-C and SIGTERM into
a clean, cancelled shutdown (exit 130 / 143, no traceback) and a `MeshnodeError` into its
message and exit code. `main` (cli/__init__.py) covers the moments before and after trio
runs, such as imports.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar, cast

import typer
from rich.console import Console
from rich.highlighter import NullHighlighter
from rich.logging import RichHandler
from rich.markup import escape

# Interrupted lives in cli/__init__.py: its signal handlers raise it before this loads.
from meshnode.cli import Interrupted
from meshnode.core.errors import EXIT_USAGE, MeshnodeError
from meshnode.core.text import for_terminal
from meshnode.library_logs import set_library_level

if TYPE_CHECKING:
    from meshnode.pay.channel.pool import Budget
    from meshnode.pay.ton.chain_choice import ChainChoice

out = Console(soft_wrap=True)  # addresses and ids must stay copy-pasteable
err = Console(stderr=True, soft_wrap=True)
T = TypeVar("T")

# --- options shared by several commands ------------------------------------------------

HomeOpt = Annotated[
    Path | None,
    typer.Option("--home", help="Data dir for keys and state (default $MESHNODE_HOME or XDG)."),
]
VerboseOpt = Annotated[
    int,
    typer.Option(
        "--verbose", "-v", count=True,
        help="-v: meshnode's debug lines; -vv: the libraries' (libp2p, llama.cpp) too.",
    ),
]
BootstrapOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--bootstrap",
        help="Bootstrap peer multiaddr (repeatable; default: the packaged peers.toml).",
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
DepositOpt = Annotated[
    str,
    typer.Option("--deposit", envvar="MESHNODE_DEPOSIT",
                 help="TON locked in each channel a routed job opens to a provider."),
]
BudgetOpt = Annotated[
    str,
    typer.Option("--budget", envvar="MESHNODE_BUDGET",
                 help="TON this data dir may ever commit to channels (deposits of open "
                      "ones plus what closed ones paid)."),
]
IdleCloseOpt = Annotated[
    float,
    typer.Option("--idle-close", envvar="MESHNODE_IDLE_CLOSE",
                 help="Close a channel unused for this many seconds."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
WaitOpt = Annotated[float, typer.Option("--wait", help="Seconds to listen to gossip first.")]
MetricsOpt = Annotated[
    str | None,
    typer.Option(
        "--metrics",
        help="Serve Prometheus metrics and the status page on HOST:PORT (loopback unless "
        "--allow-remote-metrics), e.g. 127.0.0.1:9464.",
    ),
]
RemoteMetricsOpt = Annotated[
    bool,
    typer.Option("--allow-remote-metrics", help="Allow --metrics on a non-loopback address."),
]

INSECURE_HINT = "pass --insecure to use them (their operators can read your prompts)"


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print a one-line error (markup allowed) and exit with `code`."""
    err.print(f"[red]{message}[/]")
    raise typer.Exit(code)


def print_json(data: Any) -> None:
    """Machine-readable output: one JSON document on stdout, nothing else."""
    print(json.dumps(data, indent=2, sort_keys=True))


# --- logging ---------------------------------------------------------------------------



# A log message longer than this is cut (with its length noted): a line is for a human,
# and formatting, wrapping and writing a megabyte costs about a second even unhighlighted.
MAX_LOG_MESSAGE_CHARS = 4096


class BoundedMessages(logging.Filter):
    """Cuts each record's message to MAX_LOG_MESSAGE_CHARS and escapes the control
    characters a terminal acts on: a last guard for a log line that carries a peer's
    text without `core.text.shown`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = for_terminal(message[:MAX_LOG_MESSAGE_CHARS])
        if len(message) > MAX_LOG_MESSAGE_CHARS:
            safe = f"{safe}…({len(message)} chars)"
        if safe != message:
            record.msg, record.args = safe, None
        return True


def terminal_log_handler(console: Console) -> logging.Handler:
    """The handler for a terminal: rich's layout, but no highlighter and no markup.

    rich's default ReprHighlighter is quadratic on a long word (a 64 KiB one took 95 s on
    a 2-core box, blocking the node's event loop), and a log line may carry a peer's text;
    the message is cut to MAX_LOG_MESSAGE_CHARS as well."""
    handler = RichHandler(console=console, show_path=False, highlighter=NullHighlighter(),
                          markup=False, keywords=[])
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.addFilter(BoundedMessages())
    return handler


def setup_logging(verbose: int) -> None:
    """0: meshnode INFO and up, libraries silent (their routine noise is not the user's);
    1 (-v): meshnode DEBUG; 2 (-vv): the libraries' DEBUG too."""
    handler: logging.Handler
    if err.is_terminal:
        handler = terminal_log_handler(err)
    else:  # journald, docker logs, a file: one line per record, never wrapped
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S%z"))
        handler.addFilter(BoundedMessages())
    logging.basicConfig(
        level=logging.DEBUG if verbose >= 2 else logging.WARNING,
        handlers=[handler],
        force=True,
    )
    library_level = logging.DEBUG if verbose >= 2 else logging.CRITICAL
    set_library_level(library_level)  # the routine noise of libp2p, llama.cpp, hypercorn
    logging.getLogger("meshnode").setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)
    # hypercorn's own lines ("Running on …"), routed under meshnode's name by the API server.
    logging.getLogger("meshnode.api.http").setLevel(library_level)


# --- running a command's trio code ----------------------------------------------------

SIGNAL_EXIT: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + signal number


async def _until_signal(fn: Callable[[], Awaitable[T]], got: list[int]) -> T | None:
    """Run `fn`; the first SIGINT/SIGTERM cancels it (every task unwinds and hosts close
    cleanly), a second one exits at once for an operator who will not wait."""
    import trio  # here, not at the top: `ask` through a running client never needs it

    result: list[T] = []
    body = trio.CancelScope()

    async def watch(signals: Any) -> None:
        async for signum in signals:
            if got:
                err.print("[yellow]signalled again: exiting without cleanup[/]")
                os._exit(SIGNAL_EXIT.get(signum, 1))
            got.append(signum)
            body.cancel()

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, signals)
            with body:
                result.append(await fn())
            nursery.cancel_scope.cancel()
    return result[0] if result else None


def _leaf(exc: BaseException) -> BaseException:
    """Errors inside a node's nursery arrive wrapped in (nested) one-member groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# An error's message may quote a peer (a provider's error text): shown whole up to here.
MAX_ERROR_CHARS = 2000


def exit_for(exc: MeshnodeError) -> NoReturn:
    message = escape(str(exc)[:MAX_ERROR_CHARS])  # brackets in it are text, not markup
    err.print(f"[red]{escape(exc.label)}:[/] {message}", highlight=False)
    raise typer.Exit(exc.exit_code) from None


def exit_on_signal(signum: int) -> NoReturn:
    err.print("[yellow]interrupted[/]" if signum == signal.SIGINT else "[yellow]terminated[/]")
    raise typer.Exit(SIGNAL_EXIT.get(signum, 1))


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a command's async body under trio with clean signal and error handling."""
    import trio

    got: list[int] = []
    try:
        result = trio.run(_until_signal, fn, got)
    except BaseException as raised:
        exc = _leaf(raised)
        if got:  # the error came while unwinding from the signal: the signal is the news
            exit_on_signal(got[0])
        if isinstance(exc, Interrupted):
            exit_on_signal(exc.signum)
        if isinstance(exc, KeyboardInterrupt):
            exit_on_signal(signal.SIGINT)
        if isinstance(exc, MeshnodeError):
            exit_for(exc)
        if isinstance(exc, typer.Exit):  # a check inside the body chose the exit code
            raise exc from None
        raise
    if got:
        exit_on_signal(got[0])
    return cast(T, result)


# --- shared argument parsing --------------------------------------------------------------


def bootstrap_addrs(given: list[str] | None) -> list[str]:
    from meshnode.bootstrap_peers import load_bootstrap_peers

    if given:
        return given
    try:
        return load_bootstrap_peers()
    except MeshnodeError as exc:
        exit_for(exc)


def chain_choice(chain: str, network_config: Path | None) -> ChainChoice:
    from meshnode.pay.ton.chain_choice import ChainChoice, ChainKind

    try:
        choice = ChainChoice(ChainKind(chain.lower()), network_config)
        choice.check()
    except ValueError:
        fail(f"--chain must be 'local' or 'liteclient', not {chain!r}")
    except MeshnodeError as exc:
        exit_for(exc)
    return choice


def routed_budget(deposit: str, budget: str, idle_close_s: float) -> Budget:
    """The routed-payment budget from its flags (exit 2 when they make no sense)."""
    from meshnode.channel_ops import parse_ton
    from meshnode.pay.channel.pool import Budget

    try:
        return Budget(parse_ton(deposit), parse_ton(budget), idle_close_s)
    except ValueError as exc:
        fail(escape(f"--deposit/--budget/--idle-close: {exc}"))


def metrics_bind(value: str | None, allow_remote: bool) -> tuple[str, int] | None:
    """--metrics HOST:PORT checked (loopback unless allowed), or None when not given."""
    if value is None or value.lower() == "none":
        return None
    from meshnode.ops.http import parse_bind

    try:
        return parse_bind(value, allow_remote=allow_remote)
    except MeshnodeError as exc:
        exit_for(exc)


def print_ops(endpoints: Any, home: Path | None) -> None:
    """Where the operator finds this node's status (an `ops.service.OpsEndpoints`)."""
    hint = "meshnode status" + (f" --home {home}" if home is not None else "")
    out.print(f"status    {hint}  (socket {endpoints.control_socket})")
    if endpoints.url is not None:
        out.print(f"metrics   {endpoints.url}/metrics   status page {endpoints.url}/")


def parse_channel_arg(text: str) -> int:
    from meshnode.channel_ops import parse_channel_id

    try:
        return parse_channel_id(text)
    except ValueError as exc:
        fail(str(exc))
