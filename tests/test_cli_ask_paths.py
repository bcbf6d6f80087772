"""`meshnode ask` takes the warm path through a running `meshnode client`, or its own node.

The slow tests run everything as a user does: a real provider (`meshnode serve` on the
tiny model), a real light client (`meshnode client`) on 127.0.0.1, and `ask` as its own
process. The fast ones check the state file and what the `ask` process imports.
"""

from __future__ import annotations

import json
import os
import pkgutil
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
import typer.main
from cli_proc import COMMAND_TIMEOUT_S, MULTIADDR, Running, cli, cli_env, run_cli

import meshnode.cli
from meshnode.cli import GROUPS, build_app, group_module
from meshnode.cli.ask_warm import parser
from meshnode.cli.local_client import (
    ClientState,
    find_client,
    remove_state,
    state_path,
    write_state,
)

# The warm path must not load these: each costs a large share of the cold start.
HEAVY_MODULES = ("libp2p", "trio", "numpy", "llama_cpp", "meshnode.node")
# With --seed 1 the tiny model answers this with a carriage return first: the answer
# carries a terminal control for the escaping to act on.
PROMPT = "hello"


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


# --- fast: the command table, imports, the state file -------------------------------------


def test_every_command_is_listed_under_the_module_that_registers_it() -> None:
    registered: dict[str, str] = {}
    for info in pkgutil.iter_modules(meshnode.cli.__path__):
        if info.name.startswith("_"):
            continue  # __main__ runs the command line
        module = group_module(info.name)
        if not hasattr(module, "register"):
            continue  # common, tables, local_client: no commands
        app = typer.Typer()
        module.register(app)
        names = [c.name or (c.callback.__name__ if c.callback else "") for c in
                 app.registered_commands] + [g.name or "" for g in app.registered_groups]
        registered.update(dict.fromkeys(names, info.name))
    assert registered == GROUPS


def test_help_lists_every_command_group() -> None:
    done = run_cli(cli_env(Path("/nonexistent")), "--help")
    assert done.returncode == 0, done.stderr
    listed = set(re.findall(r"^│ (\S+)\s", done.stdout, re.MULTILINE))
    assert set(GROUPS) <= listed, done.stdout


def test_the_ask_command_loads_no_libp2p_trio_or_numpy_until_it_needs_its_own_node() -> None:
    probe = ("import sys; from meshnode.cli import build_app; build_app('ask'); "
             "import meshnode.cli.local_client; "
             f"print([m for m in {HEAVY_MODULES!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, timeout=COMMAND_TIMEOUT_S)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_pre_typer_ask_path_loads_no_typer_rich_or_pydantic() -> None:
    probe = ("import sys; import meshnode.cli, meshnode.cli.ask_warm; "
             "print([m for m in ('typer', 'rich', 'pydantic', *" + repr(HEAVY_MODULES)
             + ") if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          check=True, timeout=COMMAND_TIMEOUT_S)
    assert done.stdout.strip() == "[]", done.stdout


def test_the_pre_typer_parser_has_exactly_the_options_of_typers_ask() -> None:
    group = typer.main.get_command(build_app("ask"))
    typer_ask = group.commands["ask"]  # type: ignore[attr-defined]
    typer_opts = {(tuple(sorted(p.opts)), p.nargs, bool(getattr(p, "multiple", False)),
                   bool(getattr(p, "count", False)), bool(getattr(p, "is_flag", False)))
                  for p in typer_ask.params}
    ours = set()
    for action in parser()._actions:
        names = tuple(sorted(action.option_strings or [action.dest]))
        kind = type(action).__name__
        ours.add((names, 1, kind == "_AppendAction", kind == "_CountAction",
                  kind == "_StoreTrueAction"))
    assert ours == typer_opts


def test_the_state_file_is_private_and_removed_only_by_the_client_that_wrote_it(
    tmp_path: Path,
) -> None:
    state = ClientState(url="http://127.0.0.1:8080", pid=os.getpid(), insecure=False,
                        api_key="k")
    path = write_state(tmp_path, state)
    assert path.stat().st_mode & 0o777 == 0o600
    assert find_client(tmp_path) == state
    remove_state(tmp_path, os.getpid() + 1)  # another client's exit leaves ours alone
    assert path.exists()
    remove_state(tmp_path, os.getpid())
    assert not path.exists()


def test_a_state_file_with_a_dead_pid_is_reported_stale(tmp_path: Path) -> None:
    write_state(tmp_path, ClientState(url="http://127.0.0.1:8080", pid=dead_pid(),
                                      insecure=False))
    assert "stale" in str(find_client(tmp_path))


def test_a_state_file_naming_a_remote_url_or_readable_by_others_is_not_used(
    tmp_path: Path,
) -> None:
    write_state(tmp_path, ClientState(url="http://192.0.2.1:8080", pid=os.getpid(),
                                      insecure=False))
    assert "non-loopback" in str(find_client(tmp_path))
    write_state(tmp_path, ClientState(url="http://127.0.0.1:8080", pid=os.getpid(),
                                      insecure=False))
    state_path(tmp_path).chmod(0o644)
    assert "private" in str(find_client(tmp_path))


def test_a_client_that_refuses_the_connection_sends_ask_to_its_own_node(
    tmp_path: Path,
) -> None:
    with socket.socket() as closed:  # a port nobody listens on once this is closed
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    write_state(tmp_path, ClientState(url=f"http://127.0.0.1:{port}", pid=os.getpid(),
                                      insecure=False))
    done = run_cli(cli_env(tmp_path), "ask", "--model", "m", "-v", "hello")
    assert "path: own node (the running client is unavailable: cannot reach it" in \
        done.stderr, done.stderr
    assert done.returncode == 2 and "needs a bootstrap peer" in done.stderr


def test_ctrl_c_while_ask_waits_on_the_client_exits_130_without_a_traceback(
    tmp_path: Path,
) -> None:
    with socket.socket() as silent:  # accepts the request, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        write_state(tmp_path, ClientState(
            url=f"http://127.0.0.1:{silent.getsockname()[1]}", pid=os.getpid(),
            insecure=False))
        asking = subprocess.Popen(cli("ask", "--model", "m", "hello"), env=cli_env(tmp_path),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  stdin=subprocess.DEVNULL)
        silent.settimeout(COMMAND_TIMEOUT_S)
        conn, _ = silent.accept()
        with conn:
            conn.settimeout(COMMAND_TIMEOUT_S)
            assert conn.recv(65536).startswith(b"POST /v1/completions")
            asking.send_signal(signal.SIGINT)
            _, err = asking.communicate(timeout=COMMAND_TIMEOUT_S)
    assert asking.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err


# --- slow: a real provider, a real client, ask as a process -------------------------------


@dataclass
class Mesh:
    addr: str  # the provider's multiaddr
    model_id: str
    home: Path  # the running client's --home
    client: Running


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, tiny_gguf_path: Path) -> Iterator[Mesh]:
    provider = Running.start(
        cli("serve", "--model", str(tiny_gguf_path), "--listen", "/ip4/127.0.0.1/tcp/0",
            "--ctx", "512", "--tee", "dev"),
        cli_env(tmp_path_factory.mktemp("provider")),
    )
    client: Running | None = None
    try:
        model_id = provider.wait_for(r"model id\s+(\w+)")[1]
        addr = provider.wait_for(MULTIADDR)[1]
        home = tmp_path_factory.mktemp("client")
        client = Running.start(cli("client", "--peer", addr, "--api", "127.0.0.1:0",
                                   "--insecure"), cli_env(home))
        client.wait_for("OpenAI-compatible API")
        yield Mesh(addr, model_id, home, client)
    finally:
        if client is not None:
            client.stop()
        provider.stop()


def ask(mesh: Mesh, *args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(cli_env(home or mesh.home), "ask", "--insecure", "--max-tokens", "8",
                   "--seed", "1", "-v", *args, PROMPT)


@pytest.mark.slow
def test_ask_streams_through_the_running_client_with_the_same_output_as_its_own_node(
    mesh: Mesh,
) -> None:
    warm = ask(mesh, "--model", mesh.model_id)
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert "path: running client" in warm.stderr
    # --peer always runs its own node; same provider, same seed: the same bytes on stdout.
    by_peer = ask(mesh, "--peer", mesh.addr)
    assert by_peer.returncode == 0, by_peer.stderr[-2000:]
    assert "path: own node" in by_peer.stderr
    assert warm.stdout == by_peer.stdout and warm.stdout.strip()
    raw = json.loads(ask(mesh, "--model", mesh.model_id, "--json").stdout)["text"]
    assert "\r" in raw and "\r" not in warm.stdout  # the provider's CR is shown escaped


@pytest.mark.slow
def test_ask_json_through_the_running_client_matches_its_own_nodes(mesh: Mesh) -> None:
    warm = ask(mesh, "--model", mesh.model_id, "--json")
    cold = ask(mesh, "--peer", mesh.addr, "--json")
    assert warm.returncode == 0 and cold.returncode == 0, warm.stderr + cold.stderr
    assert "path: running client" in warm.stderr and "path: own node" in cold.stderr
    w, c = json.loads(warm.stdout), json.loads(cold.stdout)
    assert set(w) == set(c)
    timing = {"ttft_s", "elapsed_s"}
    assert {k: v for k, v in w.items() if k not in timing} == \
        {k: v for k, v in c.items() if k not in timing}


@pytest.mark.slow
def test_a_stale_state_file_with_a_dead_pid_falls_back_to_its_own_node(
    mesh: Mesh, tmp_path: Path,
) -> None:
    # The client's real, listening URL, but under a pid that is gone: not to be used.
    live = find_client(mesh.home)
    assert isinstance(live, ClientState)
    write_state(tmp_path, ClientState(url=live.url, pid=dead_pid(), insecure=True))
    done = ask(mesh, "--model", mesh.model_id, home=tmp_path)
    assert "path: own node (stale state file" in done.stderr, done.stderr[-2000:]
    # Its own node has no bootstrap peer to find --model with (tests ship none).
    assert done.returncode == 2 and "needs a bootstrap peer" in done.stderr


@pytest.mark.slow
def test_an_ask_that_refuses_dev_providers_does_not_use_a_client_that_admits_them(
    mesh: Mesh,
) -> None:
    done = run_cli(cli_env(mesh.home), "ask", "--model", mesh.model_id, "-v", "hello")
    assert "path: own node (the running client admits" in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_the_client_removes_its_state_file_when_it_stops(tmp_path: Path) -> None:
    client = Running.start(cli("client", "--api", "127.0.0.1:0"), cli_env(tmp_path))
    try:
        client.wait_for("OpenAI-compatible API")
        state = find_client(tmp_path)
        assert isinstance(state, ClientState) and state.pid == client.process.pid
        assert state_path(tmp_path).stat().st_mode & 0o777 == 0o600
    finally:
        assert client.stop() == 143
    assert not state_path(tmp_path).exists()
