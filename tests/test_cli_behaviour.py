"""How the `meshnode` command behaves for a user: signals, tables, --json, hints, log levels
and `meshnode status`. Every command runs as its own process against a loopback mesh."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_proc import MULTIADDR, Running, cli, cli_env, run_cli

pytestmark = pytest.mark.slow

NARROW = "40"  # a terminal far narrower than one multiaddr


@dataclass
class LocalMesh:
    bootstrap: str
    provider: str  # the one provider's peer id
    env: dict[str, str]
    running: Running


@pytest.fixture(scope="module")
def testnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """`meshnode testnet` with one dev provider (no TEE), as the README runs it."""
    home = tmp_path_factory.mktemp("testnet")
    env = cli_env(home, COLUMNS=NARROW)
    running = Running.start(cli("testnet", "--providers", "1", "--models", "1"), env)
    try:
        provider = running.wait_for(r"provider 0: tiny-0 (\w+)")[1]
        boot = running.wait_for("join with --bootstrap " + MULTIADDR.pattern)[1]
        yield LocalMesh(boot, provider, cli_env(tmp_path_factory.mktemp("user"),
                                              COLUMNS=NARROW), running)
    finally:
        running.stop()


def test_the_peers_table_keeps_whole_ids_and_addresses_when_piped_to_a_narrow_terminal(
    testnet: LocalMesh,
) -> None:
    done = run_cli(testnet.env, "peers", "--bootstrap", testnet.bootstrap, "--insecure")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if line.startswith(testnet.provider))
    addr = MULTIADDR.search(row)
    assert addr is not None and addr[1].endswith("/p2p/" + testnet.provider)
    assert "…" not in done.stdout


def test_peers_and_models_print_json_with_full_ids(testnet: LocalMesh) -> None:
    peers = run_cli(testnet.env, "peers", "--bootstrap", testnet.bootstrap, "--insecure",
                    "--json")
    models = run_cli(testnet.env, "models", "--bootstrap", testnet.bootstrap, "--insecure",
                     "--json")
    assert peers.returncode == 0 and models.returncode == 0, peers.stderr + models.stderr
    (provider,) = json.loads(peers.stdout)["providers"]
    assert provider["peer_id"] == testnet.provider and provider["insecure"] is True
    assert any(a.endswith("/p2p/" + testnet.provider) for a in provider["addrs"])
    (model,) = json.loads(models.stdout)["models"]
    assert model["name"] == "tiny-0" and re.fullmatch(r"[0-9a-f]{64}", model["id"])
    assert model["providers"] == 1 and model["verified_providers"] == 1


def test_without_insecure_listings_say_dev_providers_were_refused_and_name_the_flag(
    testnet: LocalMesh,
) -> None:
    peers = run_cli(testnet.env, "peers", "--bootstrap", testnet.bootstrap)
    models = run_cli(testnet.env, "models", "--bootstrap", testnet.bootstrap, "--json")
    assert peers.returncode == 0 and models.returncode == 0
    for done in (peers, models):
        assert "1 provider(s) run without a TEE" in done.stderr
        assert "--insecure" in done.stderr
    assert json.loads(models.stdout)["dev_refused"] == 1


def test_an_answer_refused_for_want_of_a_tee_names_the_insecure_flag(testnet: LocalMesh) -> None:
    done = run_cli(testnet.env, "ask", "--model", "tiny-0", "--bootstrap", testnet.bootstrap,
                   "--max-tokens", "4", "hello")
    assert done.returncode == 6
    assert "run without a TEE" in done.stderr and "--insecure" in done.stderr


def test_a_client_without_insecure_says_why_its_api_lists_no_models(
    testnet: LocalMesh, tmp_path: Path
) -> None:
    running = Running.start(cli("client", "--api", "127.0.0.1:0", "--bootstrap",
                                testnet.bootstrap), cli_env(tmp_path))
    try:
        line = running.wait_for_stderr("run without a TEE")
    finally:
        running.stop()
    assert "1 provider(s)" in line and "--insecure" in line


def _ask(testnet: LocalMesh, *flags: str) -> str:
    done = run_cli(testnet.env, "ask", "--model", "tiny-0", "--bootstrap", testnet.bootstrap,
                   "--insecure", "--max-tokens", "4", *flags, "hello")
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_the_default_level_shows_no_library_lines(testnet: LocalMesh) -> None:
    stderr = _ask(testnet)
    assert "DEBUG" not in stderr and "multiaddr" not in stderr and "libp2p" not in stderr
    assert len(stderr.splitlines()) <= 3  # the TEE warning and the usage line
    assert f"tokens from {testnet.provider}," in stderr  # the whole peer id, not a suffix


def test_v_adds_meshnodes_debug_lines_and_vv_the_libraries(testnet: LocalMesh) -> None:
    one, two = _ask(testnet, "-v"), _ask(testnet, "-vv")
    assert "meshnode.client.verified" in one and "attestation dev" in one
    assert "multiaddr" not in one and "libp2p" not in one
    assert re.search(r"DEBUG (multiaddr|libp2p)", two)


def test_a_client_without_gossipsub_leaves_no_noise_in_the_providers_log(
    testnet: LocalMesh,
) -> None:
    peers = run_cli(testnet.env, "peers", "--bootstrap", testnet.bootstrap, "--insecure",
                    "--json")
    (provider,) = json.loads(peers.stdout)["providers"]
    direct = run_cli(testnet.env, "ask", "--peer", provider["addrs"][0], "--insecure",
                     "--max-tokens", "4", "hello")  # no bootstrap: this client runs no gossip
    assert direct.returncode == 0, direct.stderr
    import time

    time.sleep(1.0)  # the provider's gossip tries the new peer right after it connects
    log = "".join(testnet.running.err)
    assert "meshsub" not in log and "Traceback" not in log, log[-3000:]


# A peer id nobody runs, on a port nothing listens on: every dial fails at once.
NOBODY = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWEBeinpaTmmvjULN54PkzhNsRzu8ZeCyWZs6ekySHvggC"


def test_an_unreachable_peer_is_one_line_and_the_libraries_lines_wait_for_vv(
    tmp_path: Path,
) -> None:
    """`ask` imports py-libp2p only once it needs its own node, after logging is set up;
    that import resets libp2p's logger, whose errors then printed bare ("Failed to open
    TCP stream", four times) and whose debug lines -vv lost."""
    env = cli_env(tmp_path)
    quiet = run_cli(env, "ask", "--peer", NOBODY, "--insecure", "--max-tokens", "4", "hi")
    assert quiet.returncode == 3, quiet.stderr
    assert quiet.stderr.splitlines() == [
        line for line in quiet.stderr.splitlines() if line.startswith("cannot reach ")
    ], quiet.stderr
    loud = run_cli(env, "ask", "--peer", NOBODY, "--insecure", "--max-tokens", "4", "-vv", "hi")
    assert loud.returncode == 3
    assert re.search(r"ERROR libp2p\.transport\.tcp\.tcp: Failed to open TCP stream",
                     loud.stderr), loud.stderr[-3000:]
    assert "DEBUG libp2p.network.swarm" in loud.stderr  # from the node's own start


# --- a running provider and `meshnode status` --------------------------------------------


@dataclass
class Served:
    home: Path
    peer_id: str
    running: Running


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_gguf_path: Path) -> Iterator[Served]:
    home = tmp_path_factory.mktemp("provider")
    running = Running.start(
        cli("serve", "--model", str(tiny_gguf_path), "--listen", "/ip4/127.0.0.1/tcp/0",
            "--ctx", "512", "--metrics", "127.0.0.1:0"),
        cli_env(home),
    )
    try:
        peer_id = running.wait_for(r"peer id\s+(\w+)")[1]
        running.wait_for(r"^status\s+meshnode status")
        yield Served(home, peer_id, running)
    finally:
        running.stop()


def test_status_reads_a_running_provider_over_its_control_socket(served: Served) -> None:
    as_json = run_cli(cli_env(served.home), "status", "--json")
    as_text = run_cli(cli_env(served.home, COLUMNS=NARROW), "status")
    assert as_json.returncode == 0 and as_text.returncode == 0, as_json.stderr + as_text.stderr
    doc = json.loads(as_json.stdout)
    assert doc["role"] == "provider" and doc["peer_id"] == served.peer_id
    assert doc["models"][0]["name"] == "tiny-llama-random"
    assert doc["jobs"]["slots"] == 4  # serve --slots default
    assert f"peer id   {served.peer_id}" in as_text.stdout
    assert (served.home / "run" / "control.sock").stat().st_mode & 0o777 == 0o600


def test_status_without_a_running_node_says_so(tmp_path: Path) -> None:
    done = run_cli(cli_env(tmp_path), "status")
    assert done.returncode == 3
    assert "no node is running with home" in done.stderr and "Traceback" not in done.stderr


def test_a_second_node_on_the_same_home_is_refused(served: Served, tiny_gguf_path: Path) -> None:
    done = run_cli(cli_env(served.home), "bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0")
    assert done.returncode == 2
    assert "another node is running with this home" in done.stderr


# --- signals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "ready", "signum", "code"),
    [
        (["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0"], "join with", signal.SIGINT, 130),
        (["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0"], "join with", signal.SIGTERM, 143),
        (["client", "--api", "127.0.0.1:0"], "OpenAI-compatible API", signal.SIGINT, 130),
        (["client", "--api", "127.0.0.1:0"], "OpenAI-compatible API", signal.SIGTERM, 143),
        (["testnet", "--providers", "1", "--models", "1"], "testnet up", signal.SIGINT, 130),
        (["testnet", "--providers", "1", "--models", "1"], "testnet up", signal.SIGTERM, 143),
    ],
    ids=["bootstrap-ctrl-c", "bootstrap-sigterm", "client-ctrl-c", "client-sigterm",
         "testnet-ctrl-c", "testnet-sigterm"],
)
def test_a_long_running_command_stops_cleanly_on_a_signal(
    tmp_path: Path, command: list[str], ready: str, signum: int, code: int
) -> None:
    running = Running.start(cli(*command), cli_env(tmp_path))
    running.wait_for(ready)
    assert running.stop(signum) == code
    stderr = "".join(running.err)
    assert "Traceback" not in stderr and "ExceptionGroup" not in stderr, stderr[-3000:]
    assert ("interrupted" if signum == signal.SIGINT else "terminated") in stderr
    assert not (tmp_path / "run" / "control.sock").exists()


def test_ctrl_c_on_a_provider_exits_130(tmp_path: Path, tiny_gguf_path: Path) -> None:
    running = Running.start(
        cli("serve", "--model", str(tiny_gguf_path), "--listen", "/ip4/127.0.0.1/tcp/0",
            "--ctx", "512"),
        cli_env(tmp_path),
    )
    running.wait_for("^status ")
    assert running.stop(signal.SIGINT) == 130
    assert "Traceback" not in "".join(running.err)


def test_serve_with_tdx_outside_a_td_says_why_without_a_traceback(
    tmp_path: Path, tiny_gguf_path: Path
) -> None:
    done = run_cli(cli_env(tmp_path), "serve", "--model", str(tiny_gguf_path), "--listen",
                   "/ip4/127.0.0.1/tcp/0", "--ctx", "512", "--tee", "tdx")
    assert done.returncode == 1
    assert "no TEE evidence:" in done.stderr and "Traceback" not in done.stderr
    assert "configfs" in done.stderr  # it says what to check
