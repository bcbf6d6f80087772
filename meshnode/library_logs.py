"""The level the command line gives the libraries' loggers, and putting it back after
py-libp2p's import undid it.

Importing `libp2p` (its package `__init__`) resets the "libp2p" logger: level WARNING,
propagation off, handlers cleared. A command that imports it after setting up logging
(`ask` and `doctor` import it only once they need a node) then printed libp2p's errors
bare through `logging.lastResort` ("Failed to open TCP stream", once per dial attempt)
and lost its debug lines under -vv. The p2p layer calls `reapply()` when it builds a host:
after that import, before any dial.
"""

from __future__ import annotations

import logging

# Libraries whose WARNING/ERROR lines are routine at the default level: a peer that does not
# speak gossipsub (every light client) makes py-libp2p log a failed meshsub stream with a
# traceback, and the DHT/relay log every refused dial. They show from -vv on.
NOISY_LOGGERS = ("libp2p", "multiaddr", "async_service", "llama_cpp", "hypercorn")

_level: int | None = None  # None: nobody configured logging (library use, tests)


def set_library_level(level: int) -> None:
    """The level for every logger in NOISY_LOGGERS, now and after py-libp2p's import."""
    global _level
    _level = level
    reapply()


def reapply() -> None:
    if _level is None:
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(_level)
    libp2p = logging.getLogger("libp2p")
    if not libp2p.handlers:  # LIBP2P_DEBUG gives it its own handlers: leave those be
        libp2p.propagate = True
