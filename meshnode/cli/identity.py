"""`meshnode id`: this node's peer id (creating its keys if there are none yet), for
bootstrap lists, compose files and firewall notes."""

from __future__ import annotations

import typer

from meshnode.cli.common import HomeOpt, JsonOpt, exit_for, out, print_json
from meshnode.core.errors import MeshnodeError
from meshnode.identity import data_dir, load_or_create


def register(app: typer.Typer) -> None:
    app.command("id")(show_id)


def show_id(home: HomeOpt = None, json_out: JsonOpt = False) -> None:
    """Print this node's libp2p peer id (from --home; made on first use)."""
    from meshnode.core.peerid import peer_id_from_ed25519

    try:
        identity, created = load_or_create(data_dir(home))
    except MeshnodeError as exc:
        exit_for(exc)
    peer_id = peer_id_from_ed25519(identity.peer_public)
    if json_out:
        print_json({"peer_id": peer_id, "peer_public_key": identity.peer_public.hex(),
                    "job_public_key": identity.job_public.hex(), "created": created})
    else:
        out.print(peer_id, highlight=False)
