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
