"""`meshnode` command line: one module per group of commands.

A command group is a module with `register(app)`; adding one is the module plus one
entry in `GROUPS`. Shared options, logging and the trio runner live in `common.py`.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

import typer

from meshnode.cli import (
    ask,
    attest,
    channel,
    common,
    demo,
    directory,
    doctor,
    earnings,
    identity,
    lab,
    mesh,
    serve,
    status,
)

GROUPS = (
    serve, doctor, ask, directory, status, mesh, demo, identity, attest, channel, earnings, lab,
)

app = typer.Typer(
    help="meshnode: a peer-to-peer mesh for confidential LLM inference.",
    no_args_is_help=True,
    add_completion=False,
)
for group in GROUPS:
    group.register(app)


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    raise common.Interrupted(signum)


def main() -> None:
    """The `meshnode` executable: Ctrl-C or SIGTERM at any moment (imports, argument
    checks, a synchronous command) exits 130 / 143 without a traceback; inside trio,
    `common.run` turns them into a cancelled, clean shutdown instead."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    signal.signal(signal.SIGINT, _interrupted)
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        app()
    except common.Interrupted as exc:
        try:
            common.exit_on_signal(exc.signum)
        except typer.Exit as done:
            sys.exit(done.exit_code)
