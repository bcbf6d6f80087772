"""`meshnode channel open|status|close|list`, `earnings`, `serve --chain`, `ask --channel`
and the routed-payment limits of `ask --model` and `client`.

Bad input is checked in-process (it fails before any network or chain use). The paid
round trip runs the real CLI in separate processes, as a user would: a loopback
bootstrap node, a priced provider, and a client opening, using, inspecting and closing
a channel. They share a LocalChain state file under tmp_path, never ~/.cache.
"""

from __future__ import annotations

import json
import os
import queue
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pytoniq_core.boc.address import Address
from typer.testing import CliRunner

from meshnode.cli import app
from meshnode.pay.setup.keys import KEY_DIR
from meshnode.pay.setup.wiring import CLIENT_DIR
from meshnode.pay.ton.local_chain import STATE_ENV, LocalChain

STARTUP_TIMEOUT_S = 60.0
"""Importing llama.cpp and libp2p and loading the model on a busy 2-core box."""
COMMAND_TIMEOUT_S = 60.0
"""One client command: imports, a loopback dial, a few emulated contract runs."""
PRICE_PROMPT = 1_000_000
PRICE_COMPLETION = 4_000_000
MAX_TOKENS = 12

_MULTIADDR = re.compile(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)")
_CHANNEL_ID = re.compile(r"channel\s+(0x[0-9a-f]+)")
_WALLET = re.compile(r"wallet (0:[0-9a-f]{64})")


@pytest.fixture
def chain_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "local-ton-chain.json"
    monkeypatch.setenv(STATE_ENV, str(path))
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


# --- bad input, in process ------------------------------------------------------------

PEER = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWGctq8bWuudwyX6DV5NCg3qmj3Ntx6oBBKLrmCQAKmnZG"


@pytest.mark.parametrize("deposit", ["abc", "0", "-1", "0.0000000001"])
def test_open_rejects_a_deposit_that_is_not_a_positive_ton_amount(
    deposit: str, chain_state: Path, tmp_path: Path
) -> None:
    code, output = invoke("channel", "open", "--peer", PEER, "--deposit", deposit,
                          "--home", str(tmp_path / "home"))
    assert code == 2
    assert "--deposit" in output
    assert not chain_state.exists()


def test_a_liteclient_chain_with_a_bad_network_config_is_refused_before_any_dial(
    chain_state: Path, tmp_path: Path
) -> None:
    config = tmp_path / "global.config.json"
    config.write_text("{}")
    code, output = invoke("channel", "open", "--peer", PEER, "--deposit", "1",
                          "--chain", "liteclient", "--network-config", str(config),
                          "--home", str(tmp_path / "home"))
    assert code == 2
    squashed = "".join(output.split())
    assert "notaTONglobalconfig" in squashed and "".join(str(config).split()) in squashed


def test_a_corrupt_chain_state_stops_open_before_any_dial(
    chain_state: Path, tmp_path: Path
) -> None:
    chain_state.write_text("garbage{")
    code, output = invoke("channel", "open", "--peer", PEER, "--deposit", "0.1", "--insecure",
                          "--home", str(tmp_path / "home"))
    assert code == 2
    flat = "".join(output.split())
    assert "corrupt" in flat and "".join(str(chain_state).split()) in flat
    assert chain_state.read_text() == "garbage{"


def test_an_unknown_chain_kind_is_refused(chain_state: Path, tmp_path: Path) -> None:
    code, output = invoke("channel", "status", "0x1", "--chain", "mainnet",
                          "--home", str(tmp_path / "home"))
    assert code == 2
    assert "--chain" in output


def test_status_rejects_a_malformed_channel_id(chain_state: Path, tmp_path: Path) -> None:
    code, output = invoke("channel", "status", "not-an-id", "--home", str(tmp_path / "home"))
    assert code == 2
    assert "not a channel id" in output


@pytest.mark.parametrize("command", [
    ["ask", "hi", "--model", "m", "--bootstrap", PEER, "--deposit", "0"],
    ["ask", "hi", "--model", "m", "--bootstrap", PEER, "--deposit", "2", "--budget", "1"],
    ["client", "--bootstrap", PEER, "--idle-close", "0"],
])
def test_routed_payment_limits_that_make_no_sense_are_refused_before_any_dial(
    command: list[str], chain_state: Path, tmp_path: Path
) -> None:
    code, output = invoke(*command, "--home", str(tmp_path / "home"))
    assert code == 2
    assert "--deposit/--budget/--idle-close" in "".join(output.split())
    assert not chain_state.exists()


def test_channel_list_and_earnings_of_a_new_home_are_empty(
    chain_state: Path, tmp_path: Path
) -> None:
    home = str(tmp_path / "home")
    for command in (["channel", "list"], ["earnings"]):
        code, output = invoke(*command, "--json", "--home", home)
        assert code == 0, output
        assert json.loads(output) == []
        code, output = invoke(*command, "--home", home)
        assert code == 0 and "0 channel(s)" in output


def test_status_of_a_channel_this_node_never_opened_is_an_error(
    chain_state: Path, tmp_path: Path
) -> None:
    code, output = invoke("channel", "status", "0x1234", "--home", str(tmp_path / "home"))
    assert code == 1
    assert "unknown_channel" in output


def test_ask_with_a_channel_needs_a_peer(chain_state: Path, tmp_path: Path) -> None:
    code, output = invoke("ask", "--model", "tiny", "--channel", "0x1", "hi")
    assert code == 2
    assert "--peer" in output


def test_a_free_provider_refuses_to_take_payments(tmp_path: Path, tiny_gguf_path: Path) -> None:
    code, output = invoke("serve", "--model", str(tiny_gguf_path), "--chain", "local",
                          "--home", str(tmp_path / "home"))
    assert code == 2
    assert "free provider" in output


# --- the paid round trip, in real processes ------------------------------------------


@dataclass
class Served:
    process: subprocess.Popen[str]
    addr: str
    wallet: Address
    output: list[str]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshnode.cli", *args]


_LINES: dict[int, queue.Queue[str | None]] = {}


def _line_queue(process: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """Lines of the process's stdout, read by a thread. (select() on the pipe would miss
    lines already pulled into Python's buffer by an earlier readline.)"""
    lines = _LINES.get(process.pid)
    if lines is None:
        lines = _LINES[process.pid] = queue.Queue()
        stdout = process.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
    return lines


def _read_until(process: subprocess.Popen[str], pattern: re.Pattern[str],
                lines: list[str]) -> re.Match[str]:
    pending = _line_queue(process)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = pending.get(timeout=left)
        except queue.Empty:
            break
        if line is None:
            break
        lines.append(line)
        if found := pattern.search(line):
            return found
    pytest.fail(f"{process.args!r} printed no {pattern.pattern!r}:\n{''.join(lines)}")


@pytest.fixture
def env(chain_state: Path) -> dict[str, str]:
    return {**os.environ, STATE_ENV: str(chain_state), "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def bootstrap(tmp_path: Path, env: dict[str, str]) -> Iterator[str]:
    """A loopback bootstrap node, so `serve` never reads the shipped peer list."""
    with subprocess.Popen(
        _cli("bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-relay",
             "--home", str(tmp_path / "boot")),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    ) as process:
        try:
            yield _read_until(process, _MULTIADDR, [])[1]
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()  # SIGINT may be ignored when the test runner is a background job
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def served(
    tmp_path: Path, env: dict[str, str], bootstrap: str, tiny_gguf_path: Path
) -> Iterator[Served]:
    with subprocess.Popen(
        _cli("serve", "--model", str(tiny_gguf_path), "--listen", "/ip4/127.0.0.1/tcp/0",
             "--ctx", "512", "--price-prompt", str(PRICE_PROMPT),
             "--price-completion", str(PRICE_COMPLETION), "--bootstrap", bootstrap,
             "--home", str(tmp_path / "A")),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    ) as process:
        lines: list[str] = []
        try:
            addr = _read_until(process, _MULTIADDR, lines)[1]
            wallet = Address(_read_until(process, _WALLET, lines)[1])
            yield Served(process, addr, wallet, lines)
        finally:
            _stop(process)
            assert process.stdout is not None
            lines.append(process.stdout.read())


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(_cli(*args), capture_output=True, text=True, env=env,
                          timeout=COMMAND_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{args[:2]} exited {done.returncode}:\n{done.stderr}"
    return done


def _seeds(home: Path) -> list[str]:
    return [path.read_text().split()[1] for path in sorted((home / KEY_DIR).iterdir())]


@pytest.mark.slow
def test_open_ask_status_close_pays_the_provider_exactly_the_last_voucher(
    tmp_path: Path, env: dict[str, str], chain_state: Path, served: Served
) -> None:
    from meshnode.pay.channel.ledger import ChannelRef, Ledger
    from meshnode.pay.setup.keys import load_or_create_payment_keys

    home = tmp_path / "B"
    opened = run(env, "channel", "open", "--peer", served.addr, "--deposit", "0.1",
                 "--insecure", "--home", str(home))
    found = _CHANNEL_ID.search(opened.stdout)
    assert found, opened.stdout
    channel_id = found[1]
    assert "from the local-chain faucet" in opened.stdout
    asked = run(env, "ask", "--peer", served.addr, "--channel", channel_id, "--insecure",
                "--max-tokens", str(MAX_TOKENS), "--home", str(home), "hi")
    assert "paid" in asked.stderr
    with Ledger(home / CLIENT_DIR) as ledger:
        key = load_or_create_payment_keys(home)[0].channel_public
        latest = ledger.latest_voucher(ChannelRef(int(channel_id, 16), key))
    assert latest is not None and latest.voucher.sent > 0
    status = run(env, "channel", "status", channel_id, "--home", str(home))
    assert re.search(rf"seqno\s*│\s*{latest.voucher.seqno}\b", status.stdout), status.stdout
    assert re.search(r"state\s*│\s*open\b", status.stdout), status.stdout
    as_json = json.loads(run(env, "channel", "status", channel_id, "--home", str(home),
                             "--json").stdout)
    assert as_json["paid_seqno"] == latest.voucher.seqno and as_json["state"] == "open"
    assert as_json["paid_sent_nanoton"] == latest.voucher.sent
    provider_before = LocalChain(chain_state).balance(served.wallet)

    closed = run(env, "channel", "close", channel_id, "--peer", served.addr,
                 "--home", str(home))

    assert LocalChain(chain_state).balance(served.wallet) - provider_before == (
        latest.voucher.sent
    )
    assert "closed" in closed.stdout
    outputs = [opened, asked, status, closed]
    printed = "".join(p.stdout + p.stderr for p in outputs) + "".join(served.output)
    for home_dir in (home, tmp_path / "A"):
        for key_file in (home_dir / KEY_DIR).iterdir():
            assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        for seed in _seeds(home_dir):
            assert seed not in printed


@pytest.mark.slow
def test_ask_by_model_pays_through_a_channel_it_opens_and_close_all_settles_it_exactly(
    tmp_path: Path, env: dict[str, str], chain_state: Path, served: Served, bootstrap: str
) -> None:
    home = str(tmp_path / "B")
    paid = []
    for prompt in ("hi", "again"):  # the second ask, a new process, reuses the channel
        asked = run(env, "ask", "--model", "tiny-llama-random", "--bootstrap", bootstrap,
                    "--insecure", "--own-node", "--deposit", "0.05", "--max-tokens",
                    str(MAX_TOKENS), "--json", "--home", home, prompt)
        paid.append(json.loads(asked.stdout)["cost_nanoton"])
        assert paid[-1] > 0
    [listed] = json.loads(run(env, "channel", "list", "--json", "--home", home).stdout)
    assert listed["state"] == "open" and listed["paid_nanoton"] == sum(paid)
    assert listed["deposit_nanoton"] == 50_000_000
    before = LocalChain(chain_state).balance(served.wallet)
    run(env, "channel", "close-all", "--bootstrap", bootstrap, "--insecure", "--home", home)
    assert LocalChain(chain_state).balance(served.wallet) - before == sum(paid)
    from meshnode.pay.channel.ledger import Ledger

    with Ledger(Path(home) / CLIENT_DIR) as ledger:
        assert [c.state for c in ledger.channels()] == ["closed"]


def test_withdrawing_from_a_channel_this_provider_never_had_is_an_error(
    chain_state: Path, tmp_path: Path
) -> None:
    code, output = invoke("earnings", "--withdraw", "0x1", "--home", str(tmp_path / "A"))
    assert code != 0 and "unknown_channel" in output


@pytest.mark.slow
def test_a_provider_starts_withdrawing_the_latest_voucher_from_a_client_that_stays_away(
    tmp_path: Path, env: dict[str, str], served: Served
) -> None:
    from meshnode.channel_ops import format_ton

    home = str(tmp_path / "B")
    opened = run(env, "channel", "open", "--peer", served.addr, "--deposit", "0.1",
                 "--insecure", "--home", home)
    found = _CHANNEL_ID.search(opened.stdout)
    assert found, opened.stdout
    asked = run(env, "ask", "--peer", served.addr, "--channel", found[1], "--insecure",
                "--max-tokens", str(MAX_TOKENS), "--json", "--home", home, "hi")
    paid = json.loads(asked.stdout)["cost_nanoton"]
    assert paid > 0
    provider = str(tmp_path / "A")  # the client is not asked: it may be gone
    from meshnode.pay.channel.ledger import ChannelRef, Ledger
    from meshnode.pay.setup.keys import load_or_create_payment_keys
    from meshnode.pay.setup.wiring import PROVIDER_DIR

    # As if the provider had co-signed a close the client then never sent: its ledger
    # says closing, the chain says open, and only the chain counts.
    client_key = load_or_create_payment_keys(Path(home))[0].channel_public
    with Ledger(Path(provider) / PROVIDER_DIR) as ledger:
        ledger.set_state(ChannelRef(int(found[1], 16), client_key), "closing")
    started = run(env, "earnings", "--withdraw", found[1], "--home", provider)
    assert f"will pay {format_ton(paid)}" in started.stdout, started.stdout
    status = json.loads(run(env, "channel", "status", found[1], "--json", "--home",
                            home).stdout)
    assert status["state"] == "closing (quarantine)" and status["quarantine_seqno_a"] is not None
    again = run(env, "earnings", "--withdraw", found[1], "--home", provider)
    assert "still in quarantine" in again.stdout, again.stdout
