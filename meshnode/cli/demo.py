"""`meshnode demo`: a provider and a light client on loopback (meshnode/demo.py)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from meshnode.cli.common import VerboseOpt, err, out, run, setup_logging


def register(app: typer.Typer) -> None:
    app.command()(demo)


def demo(
    prompt: Annotated[str, typer.Option(help="What to ask.")] = (
        "Why is the sky blue? Explain in two sentences."
    ),
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 64,
    tiny: Annotated[bool, typer.Option(help="Use the generated tiny model.")] = False,
    verbose: VerboseOpt = 0,
) -> None:
    """A provider and a light client on loopback, streaming one answer end to end."""
    setup_logging(verbose)
    if not verbose:
        logging.getLogger("meshnode").setLevel(logging.WARNING)  # keep the answer readable
    from meshnode.demo import run_demo

    raise typer.Exit(run(lambda: run_demo(out, err, prompt, max_tokens, tiny)))
