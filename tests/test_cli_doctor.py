"""`meshnode doctor` as an operator runs it: a real runner loads the model, a real
bootstrap node on loopback is dialled, and every failure names its fix."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from meshnode.identity import NodeIdentity
from meshnode.p2p.discovery import BootstrapNode
from meshnode.p2p.host import full_addrs, running_host

pytestmark = pytest.mark.slow


def doctor(home: Path, *args: str) -> tuple[int, dict[str, Any]]:
    env = {**os.environ, "MESHNODE_HOME": str(home), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "meshnode.cli", "doctor", "--json", *args],
        env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )
    return proc.returncode, json.loads(proc.stdout)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


async def test_a_ready_machine_passes_every_check(tmp_path: Path, tiny_gguf_path: Path) -> None:
    async with running_host(NodeIdentity.generate()) as host, trio.open_nursery() as nursery:
        await nursery.start(BootstrapNode(host).run)
        boot = full_addrs(host)[0]
        code, report = await trio.to_thread.run_sync(
            lambda: doctor(tmp_path, "--model", str(tiny_gguf_path), "--listen",
                           "/ip4/127.0.0.1/tcp/0", "--bootstrap", boot))
        nursery.cancel_scope.cancel()
    checks = by_name(report)
    assert code == 0 and report["ok"]
    assert checks["model"]["status"] == "ok" and "first token" in checks["model"]["detail"]
    assert checks["bootstrap"]["status"] == "ok" and "answered" in checks["bootstrap"]["detail"]
    assert checks["llama.cpp"]["detail"].startswith("llama-cpp-python 0.3.36")
    assert "AMX" in checks["cpu / AMX"]["detail"]
    assert checks["tdx"]["status"] in ("ok", "warn")  # warn on any machine that is not a TD


def test_each_failure_exits_non_zero_and_names_its_fix(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_text("not a model")
    keys = tmp_path / "home" / "keys"
    keys.mkdir(parents=True)
    leaky = keys / "peer.ed25519"
    leaky.write_text("meshnode-ed25519-seed-v1 " + "00" * 32)
    leaky.chmod(0o644)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, report = doctor(tmp_path / "home", "--model", str(bogus), "--listen",
                              f"/ip4/127.0.0.1/tcp/{port}", "--bootstrap",
                              "/ip4/127.0.0.1/tcp/9/p2p/"
                              "12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtf")
    checks = by_name(report)
    assert code == 1 and not report["ok"]
    assert checks["model"]["status"] == "fail" and "not a GGUF" in checks["model"]["detail"]
    assert checks["key peer.ed25519"]["status"] == "fail"
    assert checks["key peer.ed25519"]["fix"] == f"chmod 600 {leaky}"
    assert checks["listen"]["status"] == "fail" and checks["listen"]["fix"]
    assert checks["bootstrap"]["status"] == "fail" and checks["bootstrap"]["fix"]


def test_the_doctor_table_keeps_a_bootstrap_address_whole_in_a_narrow_pipe(
    tmp_path: Path,
) -> None:
    """The table is as wide as its longest word (a terminal wraps whole lines); rich
    folded a multiaddr across six rows at 80 columns, or when piped."""
    addr = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWGzxzKZYveHXtpG6AsrUJBcWxHBFS2HsEoGTxrMLvKXtf"
    env = {**os.environ, "MESHNODE_HOME": str(tmp_path), "COLUMNS": "40"}
    proc = subprocess.run(
        [sys.executable, "-m", "meshnode.cli", "doctor", "--bootstrap", addr],
        env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]  # the bootstrap is unreachable
    assert addr in proc.stdout, proc.stdout
    assert proc.stderr == "", proc.stderr[-2000:]
