"""`meshnode` command line: one module per group of commands.

A command group is a module with `register(app)`; adding one is the module plus its
entry in `GROUPS` (command name -> module). Shared options, logging and the trio runner
live in `common.py`.

Groups are imported lazily: `meshnode ask` imports `cli.ask` only, not the eleven other
groups (with their llama.cpp, payment and lab imports), because its first token waits on
every import. Help, a mistyped command and `app` (for tests) build the full app. And
`ask` through a running client is tried before typer loads at all (cli/ask_warm.py).
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from functools import cache
from types import FrameType, ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import typer

# Command (or sub-group) name -> the module under meshnode.cli that registers it, in the
# order `meshnode --help` lists them. tests/test_cli_ask_paths.py checks it against what
# each module really registers.
GROUPS: dict[str, str] = {
    "serve": "serve",
    "doctor": "doctor",
    "ask": "ask",
    "client": "ask",
    "peers": "directory",
    "models": "directory",
    "status": "status",
    "bootstrap": "mesh",
    "testnet": "mesh",
    "demo": "demo",
    "id": "identity",
    "attest": "attest",
    "verify-quote": "attest",
    "channel": "channel",
    "earnings": "earnings",
    "lab": "lab",
}


def group_module(name: str) -> ModuleType:
    return importlib.import_module(f"meshnode.cli.{name}")


def _group() -> None:
    """meshnode: a peer-to-peer mesh for confidential LLM inference."""


def build_app(only: str | None = None) -> typer.Typer:
    """The typer app with every group, or with only the module that owns command `only`.

    The explicit callback keeps it a group of commands even when it holds one command
    (typer would otherwise run a lone command without its name)."""
    import typer

    app = typer.Typer(
        help="meshnode: a peer-to-peer mesh for confidential LLM inference.",
        no_args_is_help=True,
        add_completion=False,
    )
    app.callback()(_group)
    modules = [GROUPS[only]] if only in GROUPS else list(dict.fromkeys(GROUPS.values()))
    for module in modules:
        group_module(module).register(app)
    return app


def command_in(argv: list[str]) -> str | None:
    """The command `argv` (without the program name) runs, if it names a known one: the
    first word, since the top level takes no options other than --help."""
    return argv[0] if argv and argv[0] in GROUPS else None


@cache
def _full_app() -> typer.Typer:
    return build_app()


def __getattr__(name: str) -> Any:
    if name == "app":  # `from meshnode.cli import app`: every group, built once
        return _full_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Interrupted(BaseException):
    """A SIGINT/SIGTERM outside trio: raised by `main`'s handlers, so Click and Typer,
    which turn KeyboardInterrupt into "Aborted!" and exit 1, let it through. Defined here,
    not in common.py, so the handlers need no import (the warm `ask` has not loaded it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


def main() -> None:
    """The `meshnode` executable: Ctrl-C or SIGTERM at any moment (imports, argument
    checks, a synchronous command) exits 130 / 143 without a traceback; inside trio,
    `common.run` turns them into a cancelled, clean shutdown instead."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    command = command_in(sys.argv[1:])
    try:
        if command == "ask":  # the warm path answers before typer and rich are imported
            from meshnode.cli.ask_warm import try_before_typer

            try_before_typer(sys.argv[2:])
        build_app(command)()
    except Interrupted as exc:
        import typer

        from meshnode.cli import common

        try:
            common.exit_on_signal(exc.signum)
        except typer.Exit as done:
            sys.exit(done.exit_code)
