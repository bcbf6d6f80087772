"""The default bootstrap peer list (meshnode/defaults/peers.toml): where a node enters
the mesh."""

from __future__ import annotations

import tomllib
from pathlib import Path

from meshnode.core.errors import EXIT_USAGE, MeshnodeError
from meshnode.defaults import PEERS_PATH
from meshnode.p2p.host import parse_peer_addr

DEFAULT_PEERS_PATH = PEERS_PATH
MAX_BOOTSTRAP_PEERS = 64  # a node needs one reachable entry; more is a config mistake


class BootstrapListError(MeshnodeError, ValueError):
    """The peer list file is unreadable or has a bad entry; the message names it."""

    exit_code = EXIT_USAGE
    label = "bad bootstrap list"


def load_bootstrap_peers(path: Path | None = None) -> list[str]:
    path = path or DEFAULT_PEERS_PATH
    if not path.exists():
        return []
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise BootstrapListError(f"{path}: {exc}") from exc
    if data.get("version") != 1:
        raise BootstrapListError(f"{path}: version must be 1")
    peers = data.get("peers", [])
    if not isinstance(peers, list) or len(peers) > MAX_BOOTSTRAP_PEERS:
        raise BootstrapListError(f"{path}: peers must be a list of at most {MAX_BOOTSTRAP_PEERS}")
    for i, entry in enumerate(peers):
        try:
            if not isinstance(entry, str):
                raise ValueError("not a string")
            parse_peer_addr(entry)
        except ValueError as exc:
            raise BootstrapListError(f"{path}: peers[{i}]: {exc}") from exc
    return list(peers)
