"""How long `meshnode ask` takes around the answer, measured from process start.

    .venv/bin/python bench/ask_latency.py [--runs 8] [--tokens 16] [--out PATH]

Starts one provider (`meshnode serve` on the tiny random-weight model, loopback, dev
attestation) and waits until it listens, then measures both paths of `ask`, --runs times
each, one run after another:

- cold: `meshnode ask --peer ADDR --insecure`, which starts a light client node of its own;
- warm: `meshnode ask --model NAME --insecure -v` while a `meshnode client --peer ADDR
  --insecure` runs on the same --home, so ask streams from that client's API (each run's
  `-v` line is checked to say so).

For each run it records, from the moment the process is spawned: the first byte of stdout
(the first token: ask prints nothing else there before it), the last byte of the answer,
and the process exit. Also measures a bare `python -c pass`, `import meshnode.cli` and the
cold path's imports for scale, and the load average. Writes bench/results/ask_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from meshnode.core.cpu_features import cpu_model_name
from meshnode.engine.tinymodel import tiny_model_path

RESULTS = Path(__file__).parent / "results"
MULTIADDR = re.compile(r"(/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)")
# The provider loads the tiny model and starts its runner in seconds; a busy box is slower.
START_TIMEOUT_S = 120.0
# One 16-token answer from a tiny model, including imports, on a loaded 2-core box.
RUN_TIMEOUT_S = 60.0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshnode.cli", *args]


def start_provider(model: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        cli("serve", "--model", str(model), "--listen", "/ip4/127.0.0.1/tcp/0", "--ctx", "512",
            "--tee", "dev"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if found := MULTIADDR.search(line):
            return proc, found[1]
    proc.kill()
    raise SystemExit("the provider did not start")


WARM_MODEL = "tiny-llama-random"  # the tiny model's name, as adverts carry it


def start_client(addr: str, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        cli("client", "--peer", addr, "--api", "127.0.0.1:0", "--insecure"),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "OpenAI-compatible API" in line:
            return proc
    proc.kill()
    raise SystemExit("the light client did not start")


def ask_args(path: str, addr: str, tokens: int) -> list[str]:
    common = ["--insecure", "--max-tokens", str(tokens), "--seed", "1", "hello there"]
    if path == "cold":
        return cli("ask", "--peer", addr, *common)
    return cli("ask", "--model", WARM_MODEL, "-v", *common)


def one_ask(path: str, addr: str, tokens: int, env: dict[str, str]) -> dict[str, Any]:
    start = time.monotonic()
    proc = subprocess.Popen(
        ask_args(path, addr, tokens),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, stdin=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    first: float | None = None
    last: float | None = None
    out = b""
    deadline = start + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        data = os.read(fd, 65536)
        if not data:
            break
        now = time.monotonic()
        if first is None:
            first = now
        if data.strip():
            last = now
        out += data
    code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    end = time.monotonic()
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if code != 0 or first is None or last is None:
        raise SystemExit(f"ask failed ({code}): {err[-2000:]}")
    if path == "warm" and "path: running client" not in err:
        raise SystemExit(f"the warm ask did not go through the client: {err[-2000:]}")
    job = re.search(r"first after (\d+) ms, ([\d.]+) s total", err)
    return {
        "first_byte_s": round(first - start, 4),
        "last_byte_s": round(last - start, 4),
        "exit_s": round(end - start, 4),
        "after_last_byte_s": round(end - last, 4),
        "job_ttft_s": int(job[1]) / 1000 if job else None,
        "job_total_s": float(job[2]) if job else None,
        "chars": len(out),
    }


def timed(args: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run(args, env=env, check=True, stdin=subprocess.DEVNULL)
    return round(time.monotonic() - start, 4)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(float(statistics.median(r[key] for r in runs)), 4)

    return {
        **{k: med(k) for k in ("first_byte_s", "last_byte_s", "exit_s", "after_last_byte_s")},
        "job_ttft_s": statistics.median(r["job_ttft_s"] or 0 for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS / "ask_latency.json")
    args = parser.parse_args()
    load_before = round(os.getloadavg()[0], 2)
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="ask-latency-") as tmp:
        env = {**os.environ, "MESHNODE_HOME": str(Path(tmp) / "home"), "PYTHONUNBUFFERED": "1"}
        model = tiny_model_path(Path(tmp) / "models")
        # Its own home: one node per home (the client takes the home's control socket).
        provider, addr = start_provider(model, {**env, "MESHNODE_HOME": str(Path(tmp) / "p")})
        try:
            one_ask("cold", addr, args.tokens, env)  # warm the page cache and .pyc files
            runs["cold"] = [one_ask("cold", addr, args.tokens, env) for _ in range(args.runs)]
            client = start_client(addr, env)
            try:
                one_ask("warm", addr, args.tokens, env)
                runs["warm"] = [one_ask("warm", addr, args.tokens, env)
                                for _ in range(args.runs)]
            finally:
                client.terminate()
                client.wait(timeout=30)
        finally:
            provider.terminate()
            provider.wait(timeout=30)
        bare = [timed([sys.executable, "-c", "pass"], env) for _ in range(3)]
        cli_import = [timed([sys.executable, "-c", "import meshnode.cli"], env)
                      for _ in range(3)]
        cold_import = [timed([sys.executable, "-c", "import meshnode.cli.ask, meshnode.node"],
                             env) for _ in range(3)]

    result = {
        "bench": "ask_latency",
        "machine": {"cpu": cpu_model_name(Path("/proc/cpuinfo").read_text()),
                    "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_avg_1m_before": load_before,
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
        "runs": args.runs,
        "tokens": args.tokens,
        "median": {path: median_of(each) for path, each in runs.items()},
        "python_bare_s": min(bare),
        "import_meshnode_cli_s": min(cli_import),
        "import_cold_ask_s": min(cold_import),
        "each": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("machine", "median", "python_bare_s",
                                             "import_meshnode_cli_s", "import_cold_ask_s")},
                     indent=2))


if __name__ == "__main__":
    main()
