"""`meshnode demo` end to end as a user runs it (tiny model, so it needs no download)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_streams_a_paid_answer_and_closes_the_channel(tmp_path: Path) -> None:
    env = {**os.environ, "MESHNODE_HOME": str(tmp_path), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "meshnode.cli", "demo", "--tiny", "--max-tokens", "12"],
        env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "fallback: --tiny was given" in out
    assert "12 completion tokens" in out and "finish: length" in out
    assert "WITHOUT a TEE" in out
    assert "paid" in out and "closed   cooperatively (on-chain state: closed)" in out
    # Piped stderr stays empty: no llama.cpp lines (its n_ctx warning), not even the blank
    # line a load bar leaves on a console that is not a terminal.
    assert proc.stderr == "", proc.stderr[-2000:]


def test_serve_shuts_down_cleanly_on_sigterm(tmp_path: Path, tiny_gguf_path: Path) -> None:
    import signal
    import time

    env = {**os.environ, "MESHNODE_HOME": str(tmp_path), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshnode.cli", "serve", "--model", str(tiny_gguf_path),
         "--listen", "/ip4/127.0.0.1/tcp/0", "--ctx", "512"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "listening" in proc.stdout.readline():
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert "terminated" in err and "Traceback" not in err
