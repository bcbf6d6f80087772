"""`meshnode status`: what a running node (serve, client, bootstrap) is doing, read over
its local control socket (`<home>/run/control.sock`, mode 0600)."""

from __future__ import annotations

from typing import Any

import typer

from meshnode.cli.common import HomeOpt, JsonOpt, VerboseOpt, out, print_json, run, setup_logging
from meshnode.cli.tables import print_table, printable
from meshnode.identity import data_dir


def register(app: typer.Typer) -> None:
    app.command()(status)


def _ton(nano: int) -> str:
    from meshnode.channel_ops import format_ton

    return format_ton(nano)


def line(key: str, value: object) -> None:
    out.print(f"{key:<10}{value}", highlight=False, markup=False)


def _summary(doc: dict[str, Any]) -> None:
    line("role", doc.get("role"))
    line("peer id", doc.get("peer_id"))
    for addr in doc.get("addrs", []):
        line("address", addr)
    line("uptime", f"{doc.get('uptime_s', 0):.0f} s")
    line("peers", f"{doc.get('connected_peer_count', 0)} connected")
    if doc.get("role") == "provider":
        jobs = doc["jobs"]
        for m in doc.get("models", []):
            line("model", f"{printable(m['name'])} ({printable(m['quant'])}, ctx {m['ctx']}) "
                          f"{m['id']}")
        line("tee", doc.get("tee"))
        line("jobs", f"{jobs['active']}/{jobs['slots']} running, {jobs['queued']} queued, "
                     f"{jobs['completed']} completed, {jobs['cancelled']} cancelled, "
                     f"{jobs['busy']} busy answers")
        if jobs["errors"]:
            line("errors", ", ".join(f"{k}: {v}" for k, v in sorted(jobs["errors"].items())))
        line("tokens", f"{doc['tokens']['prompt']} prompt, {doc['tokens']['completion']} "
                       f"completion, {doc['tokens_per_s']:.1f} tok/s")
        if "channels" in doc:
            line("channels", f"{doc['channels']['count']} channel(s), "
                             f"{doc['channels']['vouchers_accepted']} voucher(s) since start")
            line("earnings", f"{_ton(doc['earnings']['paid_nanoton'])} paid in vouchers")
        if jobs["live"]:
            print_table("live jobs", ["job", "client", "prompt", "tokens", "elapsed s"],
                        [[j["job_id"], j["peer"], str(j["prompt_tokens"]), str(j["tokens"]),
                          str(j["elapsed_s"])] for j in jobs["live"]])
    if doc.get("role") == "client":
        jobs = doc["jobs"]
        line("jobs", f"{jobs['completed']} completed, {jobs['failed']} failed "
                     f"(of {jobs['started']})")
        line("tokens", f"{doc['tokens']['prompt']} prompt, {doc['tokens']['completion']} "
                       f"completion, last job {doc['tokens_per_s']:.1f} tok/s")
        line("spent", _ton(doc.get("spent_nanoton", 0)))
        if doc.get("dev_refused"):
            line("refused", f"{doc['dev_refused']} provider(s) without a TEE (start the "
                            "client with --insecure to use them)")
    if "providers" in doc:
        print_table(
            f"{len(doc['providers'])} provider(s) known",
            ["peer", "models", "load", "tok/s", "attestation", "advert age s"],
            [[p["peer_id"], printable(", ".join(m["name"] for m in p["models"])),
              f"{p['busy_slots']}/{p['slots']} +{p['queue_len']}", f"{p['tokens_per_s']:.1f}",
              p["verification"], str(p["advert_age_s"])] for p in doc["providers"]],
        )


def status(home: HomeOpt = None, json_out: JsonOpt = False, verbose: VerboseOpt = 0) -> None:
    """Ask the node running with this --home what it is doing: peers, models, jobs,
    channels and earnings."""
    from meshnode.ops.control import request_status

    setup_logging(verbose)
    doc = run(lambda: request_status(data_dir(home)))
    if json_out:
        print_json(doc)
    else:
        _summary(doc)
