"""``lab real``: a small scenario run by real ``meshnode`` processes, one per network
namespace, behind ``tc netem`` links from the scenario's latency model; then the same
jobs replayed in the simulator, and both side by side.

Node 0 is a bootstrap node (DHT, gossip), then the providers, then the clients. Each
client sends its share of the job schedule at the scheduled times and writes what it
measured; the simulator then replays exactly those jobs (arrival, client, prompt tokens
as the provider counted them, completion tokens) on the same mesh.

Bounded: the whole run has a deadline, every process is killed on exit, and the
namespaces are deleted even when something fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from meshnode.engine.tinymodel import tiny_model_path
from meshnode.lab.geo import CITIES
from meshnode.lab.metrics import percentiles, summarize
from meshnode.lab.netns import NetnsLab
from meshnode.lab.report import RESULTS, machine, plot_validation, write_json
from meshnode.lab.scenario import Scenario, load_scenario
from meshnode.lab.sim import Simulation
from meshnode.lab.workload import Jobs

BOOTSTRAP_UP_S = 30.0  # a bootstrap node starts in ~2 s; 30 covers a loaded machine
# Providers load the model, join the DHT and publish; clients then wait for every advert.
START_MARGIN_S = 45.0
DRAIN_S = 120.0  # after the last arrival: the slowest queued job still finishes
TERM_GRACE_S = 5.0  # SIGTERM, then SIGKILL
BOOTSTRAP_CITY = "Frankfurt"
BOOTSTRAP_LAST_MILE_MS = 1.0  # a bootstrap node sits in a data centre


def _one_way_matrix(sc: Scenario, sim: Simulation) -> list[list[float]]:
    """One-way delay (ms) between every pair of nodes: bootstrap, providers, clients."""
    mesh = sim.mesh
    lat = mesh.latency
    cities = [BOOTSTRAP_CITY if BOOTSTRAP_CITY in lat.cities else lat.cities[0]]
    miles = [BOOTSTRAP_LAST_MILE_MS]
    cities += [lat.cities[c] for c in mesh.p_city]
    miles += list(mesh.p_last_mile_ms)
    cities += [lat.cities[c] for c in mesh.c_city]
    miles += list(mesh.c_last_mile_ms)
    if cities[0] not in lat.cities:
        raise ValueError("bootstrap city missing from the latency model")
    n = len(cities)
    out = [[0.0] * n for _ in range(n)]
    for a in range(n):
        for b in range(n):
            if a != b:
                rtt = lat.base_ms[lat.index(cities[a]), lat.index(cities[b])] + miles[a] + miles[b]
                out[a][b] = float(rtt) / 2
    return out


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + TERM_GRACE_S
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(TERM_GRACE_S)


def run_real(sc: Scenario, strategy: str, workdir: Path) -> dict[str, Any]:
    """Run the scenario on real nodes; the config used and every client's records."""
    sim = Simulation(sc, strategy)  # the same mesh and job list the simulator uses
    mesh, jobs = sim.mesh, sim.jobs
    n_p, n_c = mesh.providers, mesh.clients
    model_dir = workdir / "models"
    tiny_model_path(model_dir)  # write it once, before several processes want it
    cfg: dict[str, Any] = {
        "workdir": str(workdir),
        "model_dir": str(model_dir),
        "slots": sc.slots,
        "max_queue": sc.max_queue,
        "strategy": strategy,
        "providers": [
            {"decode_tok_s": float(mesh.p_decode[i]), "prompt_tok_s": float(mesh.p_prompt[i]),
             "price_prompt_per_1k": int(mesh.p_price_prompt[i]),
             "price_completion_per_1k": int(mesh.p_price_completion[i])}
            for i in range(n_p)
        ],
        "jobs": [
            {"id": j, "client": int(jobs.client[j]), "at": float(jobs.arrival[j]),
             "prompt": "a " * max(1, int(jobs.prompt[j]) - 2),
             "completion": int(jobs.completion[j])}
            for j in range(len(jobs.arrival))
        ],
    }
    delays = _one_way_matrix(sc, sim)
    py = [sys.executable, "-m", "meshnode.lab.realnode", str(workdir / "config.json")]
    procs: list[subprocess.Popen[bytes]] = []
    with NetnsLab(1 + n_p + n_c) as lab:
        cfg["ips"] = {
            "bootstrap": [lab.ip(0)],
            "provider": [lab.ip(1 + i) for i in range(n_p)],
            "client": [lab.ip(1 + n_p + i) for i in range(n_c)],
        }
        lab.set_delays(delays)
        probe = (1, 1 + n_p)  # first provider -> first client
        cfg["ping_check"] = {"expected_ms": delays[probe[0]][probe[1]] * 2,
                             "measured_ms": lab.ping_ms(*probe)}
        (workdir / "config.json").write_text(json.dumps(cfg))
        try:
            procs.append(lab.popen(0, [*py, "bootstrap", "0"], str(workdir / "bootstrap.log")))
            addr_file = workdir / "bootstrap.addr"
            deadline = time.time() + BOOTSTRAP_UP_S
            while not addr_file.exists():
                if time.time() > deadline or procs[0].poll() is not None:
                    raise RuntimeError("bootstrap node did not start; see bootstrap.log")
                time.sleep(0.2)
            cfg["bootstrap_addr"] = addr_file.read_text().strip()
            cfg["start_at"] = time.time() + START_MARGIN_S
            (workdir / "config.json").write_text(json.dumps(cfg))
            for i in range(n_p):
                procs.append(lab.popen(1 + i, [*py, "provider", str(i)],
                                       str(workdir / f"provider{i}.log")))
            clients = [lab.popen(1 + n_p + i, [*py, "client", str(i)],
                                 str(workdir / f"client{i}.log")) for i in range(n_c)]
            procs += clients
            budget = START_MARGIN_S + float(jobs.arrival[-1]) + DRAIN_S
            end = time.time() + budget
            for c in clients:
                c.wait(max(1.0, end - time.time()))
        finally:
            _stop(procs)
    records: list[dict[str, Any]] = []
    known = []
    for i in range(n_c):
        path = workdir / f"client{i}.json"
        if path.exists():
            data = json.loads(path.read_text())
            records += data["records"]
            known.append(data["known_providers"])
    return {"config": cfg, "records": records, "known_providers": known}


def replay_jobs(sim_jobs: Jobs, records: list[dict[str, Any]]) -> Jobs:
    """The simulator's job list with the prompt sizes the real providers counted."""
    prompt = sim_jobs.prompt.copy()
    for r in records:
        if r.get("prompt_tokens"):
            prompt[r["job"]] = r["prompt_tokens"]
    return Jobs(sim_jobs.arrival, sim_jobs.client, prompt, sim_jobs.completion, sim_jobs.kind)


def compare_real_sim(sc: Scenario, strategy: str, real: dict[str, Any]) -> dict[str, Any]:
    base = Simulation(sc, strategy)
    sim = Simulation(sc, strategy, jobs=replay_jobs(base.jobs, real["records"]),
                     estimate_exact=True)
    summary = summarize(sim.run())
    recs = real["records"]
    finish = np.array([r["finish_s"] if r.get("finish_s") is not None else np.nan for r in recs])
    ttft = np.array([r.get("ttft_s", np.nan) if r.get("finish_s") is not None else np.nan
                     for r in recs])
    real_pct = {"finish_s": percentiles(finish), "ttft_s": percentiles(ttft)}
    real_stats: dict[str, Any] = {**real_pct, "jobs": len(recs),
                                  "failed": int(np.sum(~np.isfinite(finish)))}
    rows = []
    for metric in ("ttft_s", "finish_s"):
        for q in ("p50", "p95"):
            r, s = real_pct[metric][q], summary[metric][q]
            rows.append({"metric": f"{metric[:-2]} {q}", "real": r, "sim": s,
                         "sim_over_real": (s / r) if r and s is not None else None})
    return {"real": real_stats, "sim": summary, "table": rows}


def main_real(args: argparse.Namespace) -> None:
    sc = load_scenario(args.scenario)
    changes = {name: getattr(args, name) for name in ("providers", "clients", "jobs", "load",
                                                      "seed")
               if getattr(args, name, None) is not None}
    sc = sc.with_overrides(**changes) if changes else sc
    strategy = args.strategies or "p2c"
    workdir = Path(tempfile.mkdtemp(prefix="meshnode-lab-real-"))
    print(f"{sc.name}: {sc.providers} providers + {sc.clients} clients + 1 bootstrap in "
          f"network namespaces; logs in {workdir}", flush=True)
    t0 = time.time()
    load_before = os.getloadavg()
    try:
        real = run_real(sc, strategy, workdir)
    except BaseException:
        print(f"real run failed; logs kept in {workdir}", file=sys.stderr)
        raise
    print(f"real run: {len(real['records'])} job records in {time.time() - t0:.0f} s; "
          f"clients knew {real['known_providers']} providers", flush=True)
    result = compare_real_sim(sc, strategy, real)
    for row in result["table"]:
        ratio = row["sim_over_real"]
        print(f"  {row['metric']:12s} real {row['real'] or float('nan'):7.3f} s  "
              f"sim {row['sim'] or float('nan'):7.3f} s  sim/real "
              f"{ratio if ratio is not None else float('nan'):.2f}")
    out = args.out or RESULTS / f"lab_{sc.name}_real.json"
    write_json(out, {
        "scenario": {"name": sc.name, "file": str(sc.path), "strategy": strategy,
                     "providers": sc.providers, "clients": sc.clients, "jobs": sc.jobs,
                     "cities": {k: CITIES[k].name for k in sc.provider_cities}},
        "machine": machine(),
        "nodes": 1 + sc.providers + sc.clients,
        # The simulator models no CPU contention: a busy machine slows the real nodes.
        "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]],
        "ping_check": real["config"].get("ping_check"),
        "known_providers": real["known_providers"],
        "validation": result["table"],
        "real": result["real"],
        "sim": {k: result["sim"][k] for k in ("finish_s", "ttft_s", "jobs_failed",
                                              "jobs_retried")},
        "real_records": real["records"],
    })
    plot_validation(result["table"], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    shutil.rmtree(workdir / "models", ignore_errors=True)
