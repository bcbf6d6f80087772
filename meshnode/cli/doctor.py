"""`meshnode doctor`: check a machine before `serve` (see meshnode/doctor.py)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import typer

from meshnode.cli.common import (
    BootstrapOpt,
    HomeOpt,
    JsonOpt,
    VerboseOpt,
    bootstrap_addrs,
    out,
    run,
    setup_logging,
)
from meshnode.identity import data_dir


def register(app: typer.Typer) -> None:
    app.command()(doctor)


def doctor(
    model: Annotated[
        Path | None, typer.Option("--model", help="GGUF to load and decode one token with.")
    ] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Context length to load with.")] = 512,
    n_gpu_layers: Annotated[
        int | None, typer.Option("--n-gpu-layers", help="Default: all on a CUDA build.")
    ] = None,
    listen: Annotated[str, typer.Option(help="The listen multiaddr serve will use.")] = (
        "/ip4/0.0.0.0/tcp/4001"
    ),
    bootstrap: BootstrapOpt = None,
    as_json: JsonOpt = False,
    home: HomeOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Check this machine before `serve`: llama.cpp build, AMX, GPU, model load, TDX,
    keys, data dir, listen port, bootstrap peers. Exits 1 if any check fails."""
    from rich.table import Table

    from meshnode.doctor import as_json as checks_json
    from meshnode.doctor import run_checks
    from meshnode.serving import default_gpu_layers

    setup_logging(verbose)
    layers = default_gpu_layers() if n_gpu_layers is None else n_gpu_layers
    peers = bootstrap_addrs(bootstrap)
    checks = run(lambda: run_checks(
        model=model, n_ctx=ctx, n_gpu_layers=layers, home=data_dir(home), listen=listen,
        bootstrap=peers,
    ))
    failed = any(c.status == "fail" for c in checks)
    if as_json:
        print(checks_json(checks))
        raise typer.Exit(1 if failed else 0)
    # Wrapped between words, never inside one: a column is at least as wide as its
    # longest word, so a multiaddr, peer id or path stays whole and can be copied (rich
    # folded them across rows at 80 columns or when piped); a narrower terminal wraps
    # whole lines instead.
    table = Table(show_lines=False)
    table.add_column("check", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("found", overflow="fold", min_width=_longest_word(c.detail for c in checks))
    table.add_column("fix", overflow="fold", min_width=_longest_word(c.fix for c in checks))
    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    for c in checks:
        table.add_row(c.name, marks[c.status], c.detail, c.fix)
    out.print(table)
    out.print("[red]some checks failed: see the fix column[/]" if failed
              else "[green]ready to serve[/]")
    raise typer.Exit(1 if failed else 0)


def _longest_word(texts: Iterable[str]) -> int:
    return max((len(word) for text in texts for word in text.split()), default=1)
