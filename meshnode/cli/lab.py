"""`meshnode lab sim|sweep|profile|real|table ...`: the routing lab (`meshnode.lab`)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                  "help_option_names": []})(lab)


def lab(ctx: typer.Context) -> None:
    """Routing lab: `meshnode lab sim|sweep|profile|real|table ... [--options]`.

    Same as `python -m meshnode.lab ...`; see the README's "Routing lab" section."""
    from meshnode.lab.__main__ import main as lab_main

    raise typer.Exit(lab_main(list(ctx.args)))
