"""The root of meshnode's errors: one base class that carries an exit code.

The command line catches `MeshnodeError` once, prints what it says (its message tells
the user what went wrong and what to do) and exits with its `exit_code`. A module
defines its own subclass (`KeyFileError`, `ChannelError`, `JobError`, …) next to the code
that raises it and picks the exit code and label that suit it; nothing here knows them.

This module imports nothing, so every layer, the sans-io core included, may use it.
"""

from __future__ import annotations

# Exit codes of `meshnode` (README "Exit codes"). 130/143 (Ctrl-C, SIGTERM) are the shell's
# 128 + signal convention and are set by the CLI, not by an error.
EXIT_FAILURE = 1  # the operation ran and failed (the chain refused, a quote did not verify)
EXIT_USAGE = 2  # bad input or configuration: fix the command line, a file or a key
EXIT_UNREACHABLE = 3  # the named peer could not be dialled or gave no usable advert
EXIT_JOB_FAILED = 4  # a job started and did not complete
EXIT_NOT_VERIFIED = 5  # a provider failed attestation (or is a dev provider without --insecure)
EXIT_NO_PROVIDER = 6  # no eligible provider for the model


class MeshnodeError(Exception):
    """An error a command reports to its user rather than a bug.

    Subclasses set `exit_code` (the process exit status) and `label` (a short prefix such
    as "channel error"); an instance may override `exit_code` for one case."""

    exit_code: int = EXIT_FAILURE
    label: str = "error"

    def __init__(self, *args: object, exit_code: int | None = None) -> None:
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code
