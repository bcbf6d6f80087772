"""What a running node tells its operator: one `NodeView` per role.

A view reads the counters and objects the node already keeps (`JobProvider.stats` and
its live jobs, `ClientNode.stats`, the directory, the payment ledger, the libp2p host)
and turns them into a status document (`status`: JSON-ready, for `meshnode status`
and the status page) and Prometheus metric families (`metrics`). Nothing here changes
the node.

Runner restarts: an engine that supervises a runner process exposes `restarts: int`
(`RestartCounter`); until one does, the metric reads 0.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import trio
from libp2p.abc import IHost

from meshnode.core.directory import Directory, Listing
from meshnode.core.metrics_text import Family, family

if TYPE_CHECKING:
    from meshnode.node import ClientNode, ProviderNode
    from meshnode.pay.channel.ledger import Ledger, LedgerTotals
    from meshnode.pay.metering.gates import ChannelGates

# Status documents list at most this many peers/adverts: the page stays small on a big mesh.
MAX_LISTED = 200
# Peer-provided strings (model names, verification reasons) are cut to this in status.
MAX_TEXT = 120
# Reading the ledger is sqlite I/O: one thread at a time, off the trio loop.
_LEDGER_THREADS = trio.CapacityLimiter(1)


@runtime_checkable
class RestartCounter(Protocol):
    """An engine whose native work runs in a supervised process counts its restarts."""

    restarts: int


class NodeView(Protocol):
    role: str

    async def status(self) -> dict[str, Any]: ...

    async def metrics(self) -> list[Family]: ...


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def connected_peers(host: IHost) -> list[str]:
    return sorted(str(peer) for peer in host.get_connected_peers())


def advert_row(listing: Listing, now: float) -> dict[str, Any]:
    a = listing.advert
    return {
        "peer_id": a.peer_id,
        "addrs": list(a.addrs),
        "models": [{"id": m.id, "name": _cut(m.name), "quant": _cut(m.quant), "ctx": m.ctx,
                    "price_prompt_per_1k": m.price_prompt_per_1k,
                    "price_completion_per_1k": m.price_completion_per_1k}
                   for m in a.models],
        "slots": a.capacity.slots,
        "busy_slots": a.load.busy_slots,
        "queue_len": a.load.queue_len,
        "tokens_per_s": a.capacity.tokens_per_s,
        "verification": listing.verification.value,
        "reason": _cut(listing.verification_reason),
        "advert_age_s": round(max(0.0, now - listing.received_at), 1),
    }


def directory_status(directory: Directory, now: float) -> dict[str, Any]:
    listings = directory.peers(now)
    return {
        "providers": [advert_row(lst, now) for lst in listings[:MAX_LISTED]],
        "models": [
            {"id": m.id, "name": _cut(m.name), "quant": _cut(m.quant), "ctx": m.ctx,
             "providers": m.providers, "verified_providers": m.verified_providers,
             "min_price_prompt_per_1k": m.min_price_prompt_per_1k,
             "min_price_completion_per_1k": m.min_price_completion_per_1k}
            for m in directory.models(now)[:MAX_LISTED]
        ],
    }


def directory_metrics(directory: Directory, now: float) -> list[Family]:
    listings = directory.peers(now)
    by_state: dict[str, float] = {"pending": 0, "verified": 0, "failed": 0}
    for lst in listings:
        by_state[lst.verification.value] = by_state.get(lst.verification.value, 0) + 1
    ages = [max(0.0, now - lst.received_at) for lst in listings]
    return [
        family("meshnode_directory_adverts", "gauge",
               "Live provider adverts this node knows, by attestation verification state.",
               by="verification", values=by_state),
        family("meshnode_advert_age_max_seconds", "gauge",
               "Age of the oldest live advert (time since it was received).",
               max(ages) if ages else 0.0),
        family("meshnode_advert_age_min_seconds", "gauge",
               "Age of the newest live advert (time since it was received).",
               min(ages) if ages else 0.0),
        family("meshnode_directory_models", "gauge",
               "Distinct models on offer in the directory.", len(directory.models(now))),
    ]


def _peers_family(host: IHost) -> Family:
    return family("meshnode_peers_connected", "gauge", "libp2p peers connected now.",
                  len(host.get_connected_peers()))


def _base_status(role: str, peer_id: str, addrs: Sequence[str], host: IHost,
                 started_at: float, now: float) -> dict[str, Any]:
    peers = connected_peers(host)
    return {
        "role": role,
        "peer_id": peer_id,
        "addrs": list(addrs),
        "uptime_s": round(now - started_at, 1),
        "connected_peers": peers[:MAX_LISTED],
        "connected_peer_count": len(peers),
        "time": now,
    }


async def _ledger_totals(ledger: Ledger) -> LedgerTotals:
    return await trio.to_thread.run_sync(ledger.totals, limiter=_LEDGER_THREADS)


@dataclass
class ProviderView:
    node: ProviderNode
    gates: ChannelGates | None = None  # set when the provider takes payments
    started_at: float = field(default_factory=time.time)
    role: str = "provider"

    def _restarts(self) -> int:
        engine = self.node.engine
        return engine.restarts if isinstance(engine, RestartCounter) else 0

    async def status(self) -> dict[str, Any]:
        now = time.time()
        node, stats = self.node, self.node.jobs.stats
        info = node.engine.info
        doc = _base_status(self.role, node.peer_id, node.addrs, node.host, self.started_at, now)
        doc.update({
            "tee": node.settings.tee,
            "models": [{"id": info.model_id, "name": info.name, "quant": info.quant,
                        "ctx": info.n_ctx,
                        "price_prompt_per_1k": node.settings.price_prompt_per_1k,
                        "price_completion_per_1k": node.settings.price_completion_per_1k}],
            "jobs": {
                "active": node.jobs.active, "queued": node.jobs.queued,
                "slots": node.settings.slots, "max_queue": node.settings.max_queue,
                "started": stats.jobs_started, "completed": stats.jobs_completed,
                "cancelled": stats.jobs_cancelled, "busy": stats.busy_refusals,
                "errors": dict(stats.errors),
                "live": [{"job_id": j.job_id[:16], "peer": j.peer,
                          "prompt_tokens": j.prompt_tokens, "tokens": j.delivered,
                          "elapsed_s": round(now - j.started_at, 1)}
                         for j in sorted(node.jobs.live, key=lambda j: j.started_at)],
            },
            "tokens": {"prompt": stats.tokens_in, "completion": stats.tokens_out},
            "tokens_per_s": round(stats.tokens_per_s, 2),
            "runner_restarts": self._restarts(),
            "announcing": node.announcer is not None,
        })
        if self.gates is not None:
            totals = await _ledger_totals(self.gates.ledger)
            doc["channels"] = {"count": totals.channels,
                               "vouchers_accepted": self.gates.vouchers_accepted}
            doc["earnings"] = {"paid_nanoton": totals.paid_nanoton,
                               "billed_nanoton": totals.billed_nanoton}
        return doc

    async def metrics(self) -> list[Family]:
        node, stats = self.node, self.node.jobs.stats
        fams = [
            family("meshnode_jobs_total", "counter", "Jobs by outcome since start.",
                   by="outcome", values={"started": stats.jobs_started,
                                         "completed": stats.jobs_completed,
                                         "cancelled": stats.jobs_cancelled}),
            family("meshnode_tokens_total", "counter", "Tokens processed since start.",
                   by="kind", values={"prompt": stats.tokens_in,
                                      "completion": stats.tokens_out}),
            family("meshnode_decode_tokens_per_second", "gauge",
                   "Measured decode speed (EWMA over jobs), as advertised.",
                   stats.tokens_per_s),
            family("meshnode_jobs_active", "gauge", "Jobs generating now.", node.jobs.active),
            family("meshnode_queue_length", "gauge", "Jobs admitted and waiting for a slot.",
                   node.jobs.queued),
            family("meshnode_slots", "gauge", "Jobs run at once (--slots).",
                   node.settings.slots),
            family("meshnode_busy_total", "counter",
                   "Jobs answered Busy because slots and queue were full.",
                   stats.busy_refusals),
            family("meshnode_errors_total", "counter", "Jobs that ended in an error, by code.",
                   by="reason", values=dict(stats.errors)),
            family("meshnode_runner_restarts_total", "counter",
                   "Restarts of the model runner process (0 while the engine runs in-process).",
                   self._restarts()),
            _peers_family(node.host),
        ]
        if self.gates is not None:
            totals = await _ledger_totals(self.gates.ledger)
            fams += [
                family("meshnode_vouchers_accepted_total", "counter",
                       "Payment vouchers accepted (and persisted) since start.",
                       self.gates.vouchers_accepted),
                family("meshnode_earnings_nanoton_total", "counter",
                       "Paid to this provider: sum of every channel's latest voucher.",
                       totals.paid_nanoton),
                family("meshnode_channels", "gauge", "Payment channels in the ledger.",
                       totals.channels),
            ]
        return fams


@dataclass
class ClientView:
    node: ClientNode
    started_at: float = field(default_factory=time.time)
    role: str = "client"

    async def status(self) -> dict[str, Any]:
        now = time.time()
        node, stats = self.node, self.node.stats
        from meshnode.p2p.host import full_addrs

        doc = _base_status(self.role, str(node.host.get_id()), full_addrs(node.host),
                           node.host, self.started_at, now)
        doc.update(directory_status(node.directory, now))
        doc.update({
            "insecure_allowed": node.allow_insecure,
            "dev_refused": node.dev_refused(),
            "jobs": {"started": stats.jobs_started, "completed": stats.jobs_completed,
                     "failed": stats.jobs_failed, "errors": dict(stats.errors)},
            "tokens": {"prompt": stats.prompt_tokens, "completion": stats.completion_tokens},
            "tokens_per_s": round(stats.last_tokens_per_s, 2),
            "spent_nanoton": stats.spent_nanoton,
        })
        return doc

    async def metrics(self) -> list[Family]:
        node, stats = self.node, self.node.stats
        return [
            family("meshnode_jobs_total", "counter", "Jobs by outcome since start.",
                   by="outcome", values={"started": stats.jobs_started,
                                         "completed": stats.jobs_completed,
                                         "failed": stats.jobs_failed}),
            family("meshnode_tokens_total", "counter", "Tokens of this client's jobs.",
                   by="kind", values={"prompt": stats.prompt_tokens,
                                      "completion": stats.completion_tokens}),
            family("meshnode_decode_tokens_per_second", "gauge",
                   "Decode speed seen by this client in its latest job.",
                   stats.last_tokens_per_s),
            family("meshnode_errors_total", "counter", "Failed jobs, by error code.",
                   by="reason", values=dict(stats.errors)),
            family("meshnode_spent_nanoton_total", "counter",
                   "Cost of this client's completed jobs, as the providers reported it.",
                   stats.spent_nanoton),
            family("meshnode_dev_providers_refused", "gauge",
                   "Providers refused only for running without a TEE (--insecure admits them).",
                   node.dev_refused()),
            _peers_family(node.host),
            *directory_metrics(node.directory, time.time()),
        ]


@dataclass
class BootstrapView:
    host: IHost
    directory: Directory
    started_at: float = field(default_factory=time.time)
    role: str = "bootstrap"

    async def status(self) -> dict[str, Any]:
        from meshnode.p2p.host import full_addrs

        now = time.time()
        doc = _base_status(self.role, str(self.host.get_id()), full_addrs(self.host),
                           self.host, self.started_at, now)
        doc.update(directory_status(self.directory, now))
        return doc

    async def metrics(self) -> list[Family]:
        return [_peers_family(self.host), *directory_metrics(self.directory, time.time())]
