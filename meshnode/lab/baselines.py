"""The designs the mesh is compared with, as choosers of the simulator (not of the node):

* ``min_rtt``, Petals-like: among the providers a client's directory lists, the one with
  the lowest RTT from that client;
* ``oracle``, Cocoon-like: a central proxy with global, fresh knowledge. Clients send
  through their nearest proxy, which knows every provider's true speed and backlog
  (including the jobs it has just forwarded) and picks the earliest expected finish
  for a job of the client's max_tokens.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

from meshnode.lab.gossip import CityView
from meshnode.lab.workload import Floats, Mesh


def pick_min_rtt(
    view: CityView, rtt_to_providers: Floats, exclude: Collection[str], now: float
) -> int | None:
    """Provider index of the listed, live, not yet tried provider nearest the client."""
    table = view.table
    n = len(table)
    ok = table.verified[:n] & (table.expires_at[:n] > now)
    for peer in exclude:
        row = table.row_of(peer)
        if row is not None:
            ok[row] = False
    rows = np.flatnonzero(ok)
    if len(rows) == 0:
        return None
    providers = view.providers()[rows]
    return int(providers[int(np.argmin(rtt_to_providers[providers]))])


def nearest_proxies(mesh: Mesh, proxy_cities: Collection[int]) -> list[int]:
    """Each client's nearest proxy (a city index), or -1 for all when there is none
    (the oracle then routes directly)."""
    if not proxy_cities:
        return [-1] * mesh.clients
    base = mesh.latency.base_ms
    return [min(proxy_cities, key=lambda i: base[c, i]) for c in mesh.c_city]


def proxy_legs(mesh: Mesh, client: int, proxy: int) -> Floats:
    """RTT client → proxy → each provider (the Cocoon path); direct RTT without proxy."""
    if proxy < 0:
        return mesh.rtt_row_s(client)
    base = mesh.latency.base_ms
    to_proxy = (base[mesh.c_city[client], proxy] + mesh.c_last_mile_ms[client]) / 1e3
    legs: Floats = to_proxy + (base[proxy, mesh.p_city] + mesh.p_last_mile_ms) / 1e3
    return legs


def pick_oracle(
    mesh: Mesh,
    *,
    admissible: np.ndarray,  # online and with room in the queue
    next_free: Floats,  # when each provider's next slot frees
    legs: Floats,
    prompt_tokens: int,
    max_tokens: int,
    tried: Collection[int],
    now: float,
) -> int | None:
    """Provider index with the earliest expected finish, or None."""
    ok = admissible.copy()
    if tried:
        ok[np.fromiter(tried, dtype=np.int64)] = False
    if not ok.any():
        return None
    service = prompt_tokens / mesh.p_prompt + max_tokens / mesh.p_decode
    finish = np.maximum(now + legs / 2, next_free) + service + legs / 2
    finish[~ok] = np.inf
    return int(np.argmin(finish))


__all__ = ["nearest_proxies", "pick_min_rtt", "pick_oracle", "proxy_legs"]
