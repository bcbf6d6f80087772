"""Many concurrent OpenAI API requests against a light client and a few providers.

    .venv/bin/python bench/load.py [--providers 3] [--requests 1000] [--concurrency 1000]
                                   [--max-tokens 8] [--slots 2] [--out PATH]

Starts --providers `meshnode serve` processes on the tiny random-weight model (loopback,
dev attestation, free), and one `meshnode client --insecure --peer ...` serving the API,
each its own process as a user runs them. Then sends --requests completion requests,
--concurrency of them at once, each on its own connection, without retries. Every
request must complete (200) or be refused as busy (503 with Retry-After); anything else
(a 500, a connection reset, a timeout) is counted as an error. The client's RSS is
sampled throughout. Writes bench/results/load.json: counts by outcome, p50/p99 latency
of the completed requests and of the busy answers, the client's peak RSS and growth.

`drive()` is the load itself, used also by bench/soak.py and tests/test_load.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

RESULTS = Path(__file__).parent / "results"
MULTIADDR = re.compile(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)")
API_URL = re.compile(r"(http://127\.0\.0\.1:\d+)/v1")
# Imports plus a tiny model's load, several processes at once on a loaded 2-core box.
START_TIMEOUT_S = 180.0
# A request that gets no answer in this long is counted as timed out: it is hung, since
# even a queued tiny-model job finishes in seconds.
REQUEST_TIMEOUT_S = 60.0
# How often the client's RSS is sampled while the load runs.
RSS_SAMPLE_S = 0.2
MIB = 1024 * 1024
# Unexpected answers kept for the report: enough to see the cause, not the whole flood.
MAX_SAMPLES = 5
SAMPLE_CHARS = 300


def _error_code(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


@dataclass
class LoadResult:
    requests: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    ok_latency_s: list[float] = field(default_factory=list)
    busy_latency_s: list[float] = field(default_factory=list)
    busy_without_retry_after: int = 0
    busy_codes: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)  # bodies of unexpected answers
    wall_s: float = 0.0
    rss_start_mib: float = 0.0
    rss_peak_mib: float = 0.0
    rss_end_mib: float = 0.0

    @property
    def errors(self) -> int:
        return sum(n for k, n in self.outcomes.items() if k not in ("ok", "busy"))

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.outcomes["ok"],
            "busy_503": self.outcomes["busy"],
            "busy_without_retry_after": self.busy_without_retry_after,
            "busy_codes": dict(self.busy_codes),
            "samples": self.samples,
            "errors": self.errors,
            "outcomes": dict(self.outcomes),
            "ok_p50_s": percentile(self.ok_latency_s, 50),
            "ok_p99_s": percentile(self.ok_latency_s, 99),
            "busy_p50_s": percentile(self.busy_latency_s, 50),
            "busy_p99_s": percentile(self.busy_latency_s, 99),
            "wall_s": round(self.wall_s, 3),
            "rss_start_mib": round(self.rss_start_mib, 1),
            "rss_peak_mib": round(self.rss_peak_mib, 1),
            "rss_end_mib": round(self.rss_end_mib, 1),
        }


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[index], 4)


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` (Linux /proc; the benches run on Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MIB
    raise ValueError(f"no VmRSS for pid {pid}")


async def drive(
    url: str,
    model: str,
    *,
    requests: int,
    concurrency: int,
    max_tokens: int = 8,
    rss_pid: int | None = None,
) -> LoadResult:
    """Send ``requests`` completions to ``url`` (no /v1), ``concurrency`` at a time, each
    on a fresh connection; classify every answer and sample ``rss_pid``'s memory."""
    result = LoadResult(requests=requests)
    pid = os.getpid() if rss_pid is None else rss_pid
    result.rss_start_mib = result.rss_peak_mib = rss_mib(pid)
    gate = trio.Semaphore(concurrency)
    body = {"model": model, "prompt": "The weather today is", "max_tokens": max_tokens,
            "temperature": 0}
    # One connection per request, as that many separate clients would open.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)

    async def one(http: httpx.AsyncClient) -> None:
        async with gate:
            start = time.monotonic()
            try:
                resp = await http.post(f"{url}/v1/completions", json=body)
            except httpx.TimeoutException:
                result.outcomes["timeout"] += 1
                return
            except httpx.TransportError as exc:
                result.outcomes[type(exc).__name__] += 1
                return
            took = time.monotonic() - start
            if resp.status_code == 200:
                result.outcomes["ok"] += 1
                result.ok_latency_s.append(took)
            elif resp.status_code == 503:
                result.outcomes["busy"] += 1
                result.busy_latency_s.append(took)
                result.busy_codes[_error_code(resp)] += 1
                if "retry-after" not in resp.headers:
                    result.busy_without_retry_after += 1
                    if len(result.samples) < MAX_SAMPLES:
                        result.samples.append(resp.text[:SAMPLE_CHARS])
            else:
                result.outcomes[f"http_{resp.status_code}"] += 1
                if len(result.samples) < MAX_SAMPLES:
                    result.samples.append(resp.text[:SAMPLE_CHARS])

    async def sample_rss() -> None:
        while True:
            result.rss_peak_mib = max(result.rss_peak_mib, rss_mib(pid))
            await trio.sleep(RSS_SAMPLE_S)

    start = time.monotonic()
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as http:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_rss)
            async with trio.open_nursery() as senders:
                for _ in range(requests):
                    senders.start_soon(one, http)
            nursery.cancel_scope.cancel()
    result.wall_s = time.monotonic() - start
    result.rss_end_mib = rss_mib(pid)
    result.rss_peak_mib = max(result.rss_peak_mib, result.rss_end_mib)
    return result


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshnode.cli", *args]


def _wait_for(proc: subprocess.Popen[str], pattern: re.Pattern[str]) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if found := pattern.search(line):
            return found[1]
    raise SystemExit(f"{proc.args!r} did not start")


@dataclass
class LocalMesh:
    url: str  # the client's API, without /v1
    client_pid: int


@contextmanager
def local_mesh(providers: int, slots: int, queue: int) -> Iterator[LocalMesh]:
    """`providers` × `meshnode serve` + one `meshnode client` with its API, on loopback."""
    from meshnode.engine.tinymodel import tiny_model_path

    procs: list[subprocess.Popen[str]] = []
    with tempfile.TemporaryDirectory(prefix="meshnode-load-") as tmp:
        model = tiny_model_path(Path(tmp) / "models")

        def start(args: list[str], home: str) -> subprocess.Popen[str]:
            env = {**os.environ, "MESHNODE_HOME": str(Path(tmp) / home),
                   "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True, env=env, stdin=subprocess.DEVNULL)
            procs.append(proc)
            return proc

        try:
            serving = [
                start(cli("serve", "--model", str(model), "--listen", "/ip4/127.0.0.1/tcp/0",
                          "--ctx", "512", "--slots", str(slots), "--queue", str(queue),
                          "--tee", "dev"), f"provider{i}")
                for i in range(providers)
            ]
            addrs = [_wait_for(p, MULTIADDR) for p in serving]
            peers = [arg for addr in addrs for arg in ("--peer", addr)]
            client = start(cli("client", *peers, "--api", "127.0.0.1:0", "--insecure"),
                           "client")
            url = _wait_for(client, API_URL)
            yield LocalMesh(url=url, client_pid=client.pid)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


async def served_model(url: str) -> str:
    """The id of the one model the client's API lists, once it lists one."""
    async with httpx.AsyncClient(timeout=10) as http:
        with trio.fail_after(START_TIMEOUT_S):
            while True:
                data = (await http.get(f"{url}/v1/models")).json()["data"]
                if data:
                    return str(data[0]["id"])
                await trio.sleep(0.2)


def machine() -> dict[str, Any]:
    from meshnode.core.cpu_features import cpu_model_name

    return {"cpu": cpu_model_name(Path("/proc/cpuinfo").read_text()),
            "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--providers", type=int, default=3)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--queue", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = parser.parse_args()
    with local_mesh(args.providers, args.slots, args.queue) as mesh:
        model = trio.run(served_model, mesh.url)
        result = trio.run(partial_drive, mesh, model, args)
    report = {
        "bench": "load",
        "machine": machine(),
        "setup": {"providers": args.providers, "slots": args.slots, "queue": args.queue,
                  "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                  "model": "tiny random-weight llama (meshnode.engine.tinymodel)"},
        **result.summary(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


async def partial_drive(mesh: LocalMesh, model: str, args: argparse.Namespace) -> LoadResult:
    return await drive(mesh.url, model, requests=args.requests, concurrency=args.concurrency,
                       max_tokens=args.max_tokens, rss_pid=mesh.client_pid)


if __name__ == "__main__":
    main()
