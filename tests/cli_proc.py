"""Run `meshnode` commands as a user does: separate processes, output read line by line."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

STARTUP_TIMEOUT_S = 60.0
"""Importing llama.cpp and libp2p and loading a model on a busy 2-core box."""
COMMAND_TIMEOUT_S = 90.0
"""One short command (a listing, one 8-token answer) including its imports."""
STOP_TIMEOUT_S = 30.0
"""A clean shutdown: cancel every task, close hosts, remove the control socket."""
MULTIADDR = re.compile(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshnode.cli", *args]


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MESHNODE_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Running:
    """A long-running command; stdout and stderr are collected by threads."""

    process: subprocess.Popen[str]
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    _lines: queue.Queue[str | None] = field(default_factory=queue.Queue)

    @classmethod
    def start(cls, args: Sequence[str], env: dict[str, str]) -> Running:
        process = subprocess.Popen(
            list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            stdin=subprocess.DEVNULL,
        )
        running = cls(process)
        assert process.stdout is not None and process.stderr is not None

        def pump_out() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                running.out.append(line)
                running._lines.put(line)
            running._lines.put(None)

        def pump_err() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                running.err.append(line)

        threading.Thread(target=pump_out, daemon=True).start()
        threading.Thread(target=pump_err, daemon=True).start()
        return running

    def wait_for(self, pattern: re.Pattern[str] | str) -> re.Match[str]:
        pattern = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            if found := pattern.search(line):
                return found
        raise AssertionError(
            f"{self.process.args!r} printed no {pattern.pattern!r}:\n{''.join(self.out)}\n"
            f"stderr:\n{''.join(self.err)}"
        )

    def wait_for_stderr(self, text: str) -> str:
        """The first stderr line containing `text` (waits up to STARTUP_TIMEOUT_S)."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in list(self.err):
                if text in line:
                    return line
            if self.process.poll() is not None and not any(text in x for x in self.err):
                break
            time.sleep(0.2)
        raise AssertionError(f"{self.process.args!r} wrote no {text!r} to stderr:\n"
                             f"{''.join(self.err)}")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        """Send `signum`, wait for the exit, return the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"{self.process.args!r} ignored signal {signum}") from None
        time.sleep(0.2)  # let the reader threads drain the pipes
        return code


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), capture_output=True, text=True, env=env,
                          timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False)
