"""The market loop end to end, in real processes on 127.0.0.1: a bootstrap node, three
priced `meshnode serve` providers (different prices and speeds), `meshnode client --api`, and 30
requests through the real `openai` package, some streamed. One provider is SIGKILLed
in the middle of a stream and restarted. Then `meshnode channel close-all` closes every
channel cooperatively, and the local chain must agree to the nanoton:

- each provider's wallet gained exactly the price of the tokens it delivered (the
  client's ledger of what it received, job by job);
- the client's wallet lost exactly the sum of those gains;
- the killed provider was paid, through its ledger after the restart, for what it
  delivered before the kill; the others' ledgers count the same tokens as the client.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshnode.channel_ops import format_ton
from meshnode.core.meter import Price
from meshnode.engine.runner import PACE_ENV
from meshnode.pay.channel.book import ChannelBook
from meshnode.pay.channel.ledger import Ledger
from meshnode.pay.contract.code import ContractCodeError, load_payment_channel_code
from meshnode.pay.setup.keys import load_or_create_payment_keys
from meshnode.pay.setup.wiring import CLIENT_DIR, PROVIDER_DIR
from meshnode.pay.ton.local_chain import STATE_ENV, LocalChain, local_wallet_address

pytestmark = pytest.mark.slow

PRICES = [Price(1_000_000, 2_000_000), Price(2_000_000, 3_000_000), Price(500_000, 5_000_000)]
"""Nanoton per 1k prompt / completion tokens of providers 0, 1, 2."""
PACES: list[str | None] = [None, "200", "60"]
"""Decode tokens/s of providers 0, 1, 2 (runner.PACE_ENV): the CPU's own speed, then two
slower "GPUs"."""
WINDOW = 8
REQUESTS = 30
KILLED_REQUEST = 10  # this one streams a long answer; its provider is killed mid-way
STARTUP_TIMEOUT_S = 90.0
"""Importing llama.cpp and libp2p and loading the model, several processes on 2 cores."""
REQUEST_TIMEOUT_S = 120.0
TON = 10**9

_MULTIADDR = re.compile(r"listening (/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)")
_JOIN = re.compile(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)")
_WALLET = re.compile(r"wallet (0:[0-9a-f]{64})")
_API = re.compile(r"API\S* at (http://\S+)/v1")
_ACCEPTED = re.compile(r"job \w+ from \w+ accepted")
_DONE = re.compile(r"job \w+ for \w+: \d+\+\d+ tokens")


@dataclass
class Proc:
    args: list[str]
    env: dict[str, str]
    process: subprocess.Popen[str] = field(init=False)
    lines: queue.Queue[str | None] = field(init=False)
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meshnode.cli", *self.args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env=self.env,
        )
        self.lines = queue.Queue()
        stdout, lines = self.process.stdout, self.lines
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()

    def drain(self) -> None:
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.seen.append(line)

    def wait_for(self, pattern: re.Pattern[str], timeout: float = STARTUP_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if found := pattern.search(line):
                return found[1] if pattern.groups else found[0]
        pytest.fail(f"{self.args[:1]} printed no {pattern.pattern!r}:\n{''.join(self.seen)}")

    def count(self, pattern: re.Pattern[str]) -> int:
        self.drain()
        return sum(1 for line in self.seen if pattern.search(line))

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "meshnode.cli", *args], capture_output=True,
                          text=True, env=env, timeout=STARTUP_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in reversed(started):
        proc.stop()


def test_a_priced_mesh_with_a_provider_killed_mid_stream_settles_to_the_nanoton(
    tmp_path: Path, tiny_gguf_path: Path, procs: list[Proc]
) -> None:
    openai = pytest.importorskip("openai")
    try:
        code = load_payment_channel_code()
    except ContractCodeError as exc:
        pytest.fail(f"{exc} (run: python -m meshnode.pay.contract.code)")
    state = tmp_path / "chain.json"
    env = {**os.environ, STATE_ENV: str(state), "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    chain = LocalChain(state)

    boot = Proc(["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-relay",
                 "--home", str(tmp_path / "boot")], env)
    procs.append(boot)
    boot_addr = boot.wait_for(_JOIN)

    homes = [tmp_path / f"provider{i}" for i in range(3)]
    serve_args = [
        ["serve", "--model", str(tiny_gguf_path), "--ctx", "2048",
         "--listen", f"/ip4/127.0.0.1/tcp/{_free_port()}",
         "--price-prompt", str(price.prompt_per_1k),
         "--price-completion", str(price.completion_per_1k),
         "--credit-window", str(WINDOW), "--bootstrap", boot_addr, "--home", str(home)]
        for price, home in zip(PRICES, homes, strict=True)
    ]
    providers = [Proc(args, env if pace is None else {**env, PACE_ENV: pace})
                 for args, pace in zip(serve_args, PACES, strict=True)]
    procs.extend(providers)
    wallets = []
    for p in providers:
        p.wait_for(_MULTIADDR)
        wallets.append(p.wait_for(_WALLET))
    provider_keys = [load_or_create_payment_keys(h)[0].channel_public for h in homes]

    client_home = tmp_path / "client"
    client_keys, _ = load_or_create_payment_keys(client_home)
    client_wallet = local_wallet_address(client_keys.wallet_public)
    chain.faucet(client_wallet, 20 * TON)  # funded up front: no faucet top-ups during the run
    from pytoniq_core.boc.address import Address

    before = [chain.balance(Address(w)) for w in wallets]
    client_before = chain.balance(client_wallet)

    api = Proc(["client", "--api", f"127.0.0.1:{_free_port()}", "--bootstrap", boot_addr,
                "--insecure", "--deposit", "0.05", "--budget", "2", "--home",
                str(client_home)], env)
    procs.append(api)
    url = api.wait_for(_API)
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=REQUEST_TIMEOUT_S,
                        max_retries=0)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    model = None
    while time.monotonic() < deadline:
        cards = oai.models.list().data
        if cards and (cards[0].model_extra or {})["meshnode"]["verified_providers"] == 3:
            model = cards[0].id
            break
        time.sleep(0.5)
    assert model is not None, "the client never saw the three providers"

    seen_tokens = 0
    killed = -1
    served_by: list[str] = []
    for i in range(REQUESTS):
        prompt = f"Request {i}: tell me about the river"
        if i == KILLED_REQUEST:
            accepted_before = [p.count(_ACCEPTED) for p in providers]
            stream = oai.completions.create(
                model=model, prompt=prompt, max_tokens=600, temperature=0.0, stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = [], None
            for n, chunk in enumerate(stream):
                if chunk.choices:
                    text.append(chunk.choices[0].text)
                if chunk.usage is not None:
                    usage = chunk.usage
                if n == 5 and killed < 0:
                    busy = [k for k, p in enumerate(providers)
                            if p.count(_ACCEPTED) > accepted_before[k]
                            and p.count(_ACCEPTED) > p.count(_DONE)]
                    assert len(busy) == 1, [p.seen[-3:] for p in providers]
                    killed = busy[0]
                    providers[killed].stop(signal.SIGKILL)
            assert usage is not None and usage.completion_tokens == 600
            assert len("".join(text)) > 0
            seen_tokens += usage.completion_tokens
            assert providers[killed].process.returncode == -signal.SIGKILL
            providers[killed].start()  # same home, same port: it comes back as itself
            providers[killed].wait_for(_MULTIADDR)
        elif i % 3 == 0:
            stream = oai.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=24,
                temperature=0.0, stream=True, stream_options={"include_usage": True},
            )
            usage = None
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
            assert usage is not None
            seen_tokens += usage.completion_tokens
        else:
            res = oai.completions.create(model=model, prompt=prompt, max_tokens=16 + i,
                                         temperature=0.7, seed=i)
            assert res.usage is not None
            seen_tokens += res.usage.completion_tokens
            served_by.append((res.model_extra or {})["meshnode"]["provider"])
    assert killed >= 0
    api.stop()  # the client's channels stay open on file; close-all closes them

    closed = subprocess.run(
        [sys.executable, "-m", "meshnode.cli", "channel", "close-all", "--bootstrap",
         boot_addr, "--insecure", "--home", str(client_home)],
        capture_output=True, text=True, env=env, timeout=STARTUP_TIMEOUT_S, check=False)
    assert closed.returncode == 0, closed.stdout + closed.stderr

    # What the client received, job by job, per provider (its ledger).
    client_ledger = Ledger(client_home / CLIENT_DIR)
    book = ChannelBook(client_home / CLIENT_DIR, code)
    received: list[list[tuple[int, int, bool]]] = [[], [], []]
    client_refs = {}
    for entry in book.all():
        k = provider_keys.index(entry.config.key_b)
        ref = next(r.ref for r in client_ledger.channels()
                   if r.channel_id == entry.config.channel_id)
        client_refs[k] = ref
        received[k] += [(j.prompt_tokens, j.completion_tokens, j.complete)
                        for j in client_ledger.jobs(ref)]
    assert sum(c for r in received for _, c, _ in r) == seen_tokens  # all the user saw
    assert any(c > 0 and not done for _, c, done in received[killed])  # the cut job
    # Every provider served: none of the equalities below holds as 0 == 0.
    assert all(received), [len(r) for r in received]

    gains = [chain.balance(Address(w)) - b for w, b in zip(wallets, before, strict=True)]
    for k in range(3):
        expected = sum(PRICES[k].cost(p, c) for p, c, _ in received[k])
        assert gains[k] == expected, (k, gains, received[k])
    assert client_before - chain.balance(client_wallet) == sum(gains)

    for k, home in enumerate(homes):
        with Ledger(home / PROVIDER_DIR) as ledger:
            if k not in client_refs:
                continue
            stored = ledger.latest_voucher(client_refs[k])
            assert stored is not None and stored.voucher.sent == gains[k]
            if k != killed:  # both meters counted the same tokens
                provider_tokens = sum(j.completion_tokens for j in ledger.jobs(client_refs[k]))
                assert provider_tokens == sum(c for _, c, _ in received[k])
    listed = _cli(env, "channel", "list", "--home", str(client_home))
    assert listed.count("closed") >= len(client_refs), listed
    earned = _cli(env, "earnings", "--home", str(homes[killed]))
    assert format_ton(gains[killed]) in earned, earned  # what its channel paid it

    print(f"\nscenario: killed provider {killed}, gains {gains}, "
          f"channels {len(client_refs)}, tokens {seen_tokens}, "
          f"jobs per provider {[len(r) for r in received]}")
