"""A chaos testnet on loopback: priced providers in their own processes, one client in
this process, jobs routed with failover while providers are SIGKILLed, SIGSTOPped or cut
off mid-stream. Shared by tests/test_chaos.py (short, in CI) and bench/chaos.py (long).

Providers are tests/pay_provider_proc.py (the real provider node, llama.cpp on the tiny
model, a ledger on disk). Each has its own payment channel on the emulated chain (the
chain lives in this process; the provider's ledger is given the channel record, as
test_pay_crash does). A killed provider is restarted on the same ledger with a new peer
id, and the same channel pays it: its ledger must carry on from the vouchers it kept.

The client learns adverts only by dialling providers (no bootstrap), and py-libp2p's
pinned client never refreshes them (issue 13: adverts expire after ADVERT_LIFETIME_S),
so the harness re-fetches them every ADVERT_REFRESH_S; without that, every job after
300 s ends in NoProvider.

What a run checks, per job: it completes (text arriving with no gap over the client's
stall bound plus RECOVERY_ALLOWANCE_S for a failover) or ends with a typed error
(JobError, NoProvider, ProvidersBusy) within that of its last progress. The stall bound
is the client's own (core.job_protocol.StallDetector): the first-token bound of the
prompt, then max(STALL_FLOOR_S, STALL_GAP_FACTOR x the pace so far); see TextPace.
Per channel: see check_billing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID
from pay_net import DEPOSIT, PRICE, pay_net
from pytoniq_core.boc.cell import Cell

from meshnode.core.advert import Advert
from meshnode.core.errors import MeshnodeError
from meshnode.core.job_protocol import StallDetector
from meshnode.jobs.payment_gate import Payer
from meshnode.jobs.routed import NoProvider, ProvidersBusy
from meshnode.node import ADVERT_LIFETIME_S, ClientNode, client_node
from meshnode.pay.channel.ledger import ChannelRecord, Ledger
from meshnode.pay.channel.lifecycle import ClientChannel
from meshnode.pay.metering.payer import prompt_token_bound

PROVIDER_SCRIPT = Path(__file__).with_name("pay_provider_proc.py")
STARTUP_TIMEOUT_S = 60.0  # importing llama.cpp and libp2p on a busy 2-core box
STOP_TIMEOUT_S = 15.0  # SIGTERM to exit: cancel tasks, close the host and the ledger
# Vouchers every few tokens keep streams long enough to be hit mid-way, and make a
# billing error show within a job.
CHAOS_WINDOW_TOKENS = 8
# How long after a fault a new fault may hit the same provider: lets restarts finish.
FAULT_COOLDOWN_S = 2.0
# Bytes one token of the tiny model's vocabulary can print as, at most (UTF-8 pieces).
MAX_TOKEN_BYTES = 16
# A SIGSTOPped provider resumes this long after the client's stall bound for the job it
# hit: a hung provider that comes back, after the client failed over (not before).
STOP_MARGIN_S = 3.0
# Extra time over the stall bound for a failover to redial, re-open and re-prefill.
RECOVERY_ALLOWANCE_S = 15.0
# Re-fetch adverts well inside their lifetime (a stand-in for the missing refresh).
ADVERT_REFRESH_S = ADVERT_LIFETIME_S / 3
DIAL_TIMEOUT_S = 10.0  # one re-fetch of an advert from a live provider on loopback
TYPED_ERRORS = (MeshnodeError, ProvidersBusy)  # JobError and NoProvider are MeshnodeErrors

FAULTS = ("kill", "cut", "stop")


def stall_bound_s(gap_s: float = 0.0) -> float:
    """How long the job client waits mid-stream for a provider whose token frames came
    every `gap_s` before it fell silent: the client's own rule, read from
    `core.job_protocol.StallDetector` (max(STALL_FLOOR_S, STALL_GAP_FACTOR x gap), at most
    TOKEN_TIMEOUT_S). With no gap given, the bound for a fast provider (the floor)."""
    detector = StallDetector(0)
    detector.token_frame(0.0, first=True)
    if gap_s > 0:
        detector.token_frame(gap_s, first=False)
    return detector.timeout()


class TextPace:
    """The client's stall bound as a job's text arrives, from what the harness sees: the
    first text within the first-token bound of the prompt, each later piece within the
    mid-stream bound for the pace so far (the client re-learns the pace on a failover,
    from a first-token bound that is longer still, so this is the tighter of the two)."""

    def __init__(self, prompt: str) -> None:
        self.detector = StallDetector.for_prompt(prompt)
        self.first = True

    def bound(self) -> float:
        return self.detector.timeout()

    def text(self, gap_s: float) -> None:
        self.detector.token_frame(gap_s, first=self.first)
        self.first = False


@dataclass
class ChaosConfig:
    jobs: int = 15
    providers: int = 3
    concurrency: int = 3
    max_tokens: int = 160
    faults: tuple[str, ...] = ("kill", "cut")
    fault_interval_s: float = 1.5
    restart_after_s: float = 1.0
    seed: int = 1
    progress: bool = False  # print one line per finished job and fault (bench runs)


@dataclass
class JobRecord:
    index: int
    ok: bool = False
    error: str = ""
    error_type: str = ""
    typed: bool = True
    text_chars: int = 0
    completion_tokens: int = 0
    providers: list[str] = field(default_factory=list)
    segments: list[tuple[str, int, int, str | None]] = field(default_factory=list)
    prompt: str = ""
    max_gap_s: float = 0.0
    # The largest excess of a gap (or of the silence before a typed error) over the
    # client's stall bound at that point (TextPace); a failover may add up to
    # RECOVERY_ALLOWANCE_S.
    max_over_bound_s: float = 0.0
    end_after_progress_s: float = 0.0
    elapsed_s: float = 0.0


@dataclass
class FaultRecord:
    kind: str
    provider: int
    at_s: float
    job: int = -1
    """The job it hit (the one streaming from that provider)."""
    recovered_s: float | None = None
    """Time from the fault to the next text of the job it hit (None: it hit no text);
    after a stop, the next text from another provider."""
    failed_over: bool | None = None
    """Whether that next text came from another provider (the client gave up on it)."""


@dataclass
class ChaosReport:
    config: ChaosConfig
    stall_bound_s: float
    jobs: list[JobRecord]
    faults: list[FaultRecord]
    billing: list[dict[str, Any]]
    elapsed_s: float

    @property
    def completed(self) -> int:
        return sum(j.ok for j in self.jobs)

    def summary(self) -> dict[str, Any]:
        recoveries = [f.recovered_s for f in self.faults if f.recovered_s is not None]
        errors: dict[str, int] = {}
        for j in self.jobs:
            if not j.ok:
                errors[j.error_type] = errors.get(j.error_type, 0) + 1
        return {
            "jobs": len(self.jobs),
            "completed": self.completed,
            "errors": errors,
            "untyped_errors": sum(not j.typed for j in self.jobs),
            "faults": {k: sum(f.kind == k for f in self.faults) for k in FAULTS},
            "jobs_that_failed_over": sum(len(j.providers) > 1 for j in self.jobs),
            "recover_s_max": round(max(recoveries), 2) if recoveries else None,
            "recover_s_mean": round(sum(recoveries) / len(recoveries), 2) if recoveries else None,
            "max_gap_s": round(max((j.max_gap_s for j in self.jobs), default=0.0), 2),
            "max_over_bound_s": round(max((j.max_over_bound_s for j in self.jobs),
                                          default=0.0), 2),
            "recover_s_by_fault": {
                k: _stats([f.recovered_s for f in self.faults
                           if f.kind == k and f.recovered_s is not None])
                for k in FAULTS
            },
            "stall_bound_s": self.stall_bound_s,
            "billing_ok": all(b["ok"] for b in self.billing),
            "elapsed_s": round(self.elapsed_s, 1),
        }


def _stats(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"n": 0, "max": None, "mean": None, "median": None}
    ordered = sorted(values)
    return {"n": len(values), "max": round(ordered[-1], 2),
            "mean": round(sum(values) / len(values), 2),
            "median": round(ordered[len(ordered) // 2], 2)}


class Provider:
    """One provider process on its own ledger; restartable with a new peer id."""

    def __init__(self, index: int, home: Path, gguf: Path, log: Path) -> None:
        self.index = index
        self.home = home
        self.gguf = gguf
        self.log = log
        self.proc: subprocess.Popen[str] | None = None
        self.addr = ""
        self.peer_id = ""
        self.stopped = False

    async def start(self) -> str:
        argv = [sys.executable, str(PROVIDER_SCRIPT), str(self.home), str(self.gguf),
                str(PRICE.prompt_per_1k), str(PRICE.completion_per_1k),
                str(CHAOS_WINDOW_TOKENS)]
        with self.log.open("a") as err:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True,
                                         stdin=subprocess.DEVNULL)
        stdout = self.proc.stdout
        assert stdout is not None
        with trio.fail_after(STARTUP_TIMEOUT_S):
            # trio-typing (pulled in by libp2p) has stale stubs without abandon_on_cancel.
            line = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                stdout.readline, abandon_on_cancel=True
            )
        if not line:
            raise AssertionError(f"provider {self.index} exited: {self.log.read_text()[-2000:]}")
        self.addr = json.loads(line)["addr"]
        self.peer_id = self.addr.rsplit("/p2p/", 1)[1]
        self.stopped = False
        return self.addr

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            assert self.proc is not None
            os.kill(self.proc.pid, signum)

    async def wait_exit(self) -> None:
        proc = self.proc
        if proc is None:
            return
        with trio.move_on_after(STOP_TIMEOUT_S):
            await trio.to_thread.run_sync(proc.wait)
        if proc.poll() is None:
            proc.kill()
            await trio.to_thread.run_sync(proc.wait)

    async def stop(self) -> None:
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
        await self.wait_exit()


class ChaosPayments:
    """JobPayments over pre-opened channels, one per provider slot (restarts keep it).
    One job at a time per channel, as pay.channel.pool does; tracks which provider runs
    which job so faults can aim at a provider in mid-stream."""

    def __init__(self, channels: list[ClientChannel]) -> None:
        self.channels = channels
        self.slot_of: dict[str, int] = {}  # peer id -> provider index
        self.ever: dict[int, set[str]] = {}  # provider index -> every peer id it ran as
        self._locks = [trio.Lock() for _ in channels]
        self.active: dict[int, int] = {}  # provider index -> jobs in flight there
        self.task_slot: dict[trio.lowlevel.Task, int] = {}  # job task -> its provider now

    def affordable(self, advert: Advert, model_id: str, prompt: str, max_tokens: int) -> bool:
        return advert.peer_id in self.slot_of

    @asynccontextmanager
    async def job(
        self, advert: Advert, model_id: str, prompt: str, max_tokens: int
    ) -> AsyncIterator[Payer | None]:
        slot = self.slot_of[advert.peer_id]
        task = trio.lowlevel.current_task()
        async with self._locks[slot]:
            self.active[slot] = self.active.get(slot, 0) + 1
            self.task_slot[task] = slot
            try:
                yield self.channels[slot].payer(PRICE, CHAOS_WINDOW_TOKENS)
            finally:
                self.active[slot] -= 1
                self.task_slot.pop(task, None)


@dataclass
class _Progress:
    """The last text time of each running job, and which fault waits for its text."""

    last_text: dict[int, float] = field(default_factory=dict)
    task_of: dict[int, trio.lowlevel.Task] = field(default_factory=dict)  # job -> its task
    pending: list[tuple[FaultRecord, int]] = field(default_factory=list)
    pace: dict[int, TextPace] = field(default_factory=dict)  # job -> the client's bound


def _prompt(rng: random.Random, i: int) -> str:
    words = ["mesh", "node", "token", "stream", "fault", "provider", "channel", "ledger"]
    return f"Job {i}: " + " ".join(rng.choice(words) for _ in range(6))


async def run_chaos(cfg: ChaosConfig, tmp: Path, code: Cell, gguf: Path,
                    params: dict[str, Any]) -> ChaosReport:
    rng = random.Random(cfg.seed)
    stall = stall_bound_s()
    for fault in cfg.faults:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}")
    net = pay_net(tmp, code)
    channels = [await net.open_channel() for _ in range(cfg.providers)]
    providers: list[Provider] = []
    for i, channel in enumerate(channels):
        home = tmp / f"provider{i}"
        with Ledger(home) as ledger:  # what the provider's announce handler would store
            ledger.add_channel(
                ChannelRecord(channel.channel_id, channel.signer.public_key, DEPOSIT, 0.0)
            )
        providers.append(Provider(i, home, gguf, tmp / f"provider{i}.log"))
    payments = ChaosPayments(channels)
    jobs = [JobRecord(i, prompt=_prompt(rng, i)) for i in range(cfg.jobs)]
    faults: list[FaultRecord] = []
    progress = _Progress()
    start = time.monotonic()

    async def connect(client: ClientNode, p: Provider) -> str:
        advert = await client.connect(p.addr)
        payments.slot_of[p.peer_id] = p.index
        payments.ever.setdefault(p.index, set()).add(p.peer_id)
        return advert.models[0].id

    try:
        async with trio.open_nursery() as boot:
            for p in providers:
                boot.start_soon(p.start)
        async with client_node(allow_insecure=True, payments=payments) as client:
            model_ids = {await connect(client, p) for p in providers}
            assert len(model_ids) == 1, model_ids
            model = model_ids.pop()
            limit = trio.Semaphore(cfg.concurrency)
            done = trio.Event()
            remaining = [cfg.jobs]

            async def one_job(rec: JobRecord) -> None:
                async with limit:
                    progress.task_of[rec.index] = trio.lowlevel.current_task()
                    t0 = time.monotonic()
                    last = [t0]
                    pace = progress.pace[rec.index] = TextPace(rec.prompt)

                    async def on_text(text: str) -> None:
                        now = time.monotonic()
                        gap = now - last[0]
                        rec.max_gap_s = max(rec.max_gap_s, gap)
                        rec.max_over_bound_s = max(rec.max_over_bound_s, gap - pace.bound())
                        pace.text(gap)
                        last[0] = now
                        progress.last_text[rec.index] = now
                        slot = payments.task_slot.get(trio.lowlevel.current_task())
                        for fault, job in list(progress.pending):
                            if job != rec.index:
                                continue
                            if fault.kind == "stop" and slot == fault.provider:
                                continue  # sent before the hang (or after the resume)
                            fault.recovered_s = now - (start + fault.at_s)
                            fault.failed_over = slot is not None and slot != fault.provider
                            progress.pending.remove((fault, job))

                    try:
                        res = await client.complete(model, rec.prompt, max_tokens=cfg.max_tokens,
                                                    params=params, on_text=on_text)
                        rec.ok = True
                        rec.text_chars = len(res.text)
                        rec.completion_tokens = res.usage.completion_tokens
                        rec.providers = res.providers
                        rec.segments = [(s.provider, s.completion_tokens, s.cost_nanoton, s.error)
                                        for s in res.segments]
                    except TYPED_ERRORS as exc:
                        rec.error, rec.error_type = str(exc)[:200], type(exc).__name__
                        if isinstance(exc, NoProvider):
                            rec.providers = exc.attempts
                    except Exception as exc:  # an untyped error is a finding
                        rec.error, rec.error_type = repr(exc)[:200], type(exc).__name__
                        rec.typed = False
                    end = time.monotonic()
                    rec.elapsed_s = end - t0
                    rec.end_after_progress_s = end - last[0]
                    if not rec.ok:
                        rec.max_over_bound_s = max(rec.max_over_bound_s,
                                                   rec.end_after_progress_s - pace.bound())
                    progress.last_text.pop(rec.index, None)
                    progress.task_of.pop(rec.index, None)
                    progress.pace.pop(rec.index, None)
                    if cfg.progress:
                        print(f"{end - start:7.1f} s job {rec.index}: "
                              f"{'ok' if rec.ok else rec.error_type} after {rec.elapsed_s:.1f} s, "
                              f"{len(rec.providers)} provider(s)", flush=True)
                    remaining[0] -= 1
                    if not remaining[0]:
                        done.set()

            async def restart(p: Provider) -> None:
                await trio.sleep(cfg.restart_after_s)
                await p.start()
                await connect(client, p)

            async def chaos() -> None:
                cooldown: dict[int, float] = {}
                while not done.is_set():
                    await trio.sleep(cfg.fault_interval_s * (0.5 + rng.random()))
                    if done.is_set():
                        return
                    now = time.monotonic()
                    healthy = [p for p in providers if p.alive() and not p.stopped
                               and p.peer_id in payments.slot_of]
                    if len(healthy) < 2:  # keep one provider serving: jobs must complete
                        continue
                    streaming = {payments.task_slot.get(task): job
                                 for job, task in progress.task_of.items()
                                 if now - progress.last_text.get(job, 0.0) < 1.0}
                    busy = [p for p in healthy if p.index in streaming
                            and now - cooldown.get(p.index, 0.0) > FAULT_COOLDOWN_S]
                    if not busy:
                        continue
                    p = rng.choice(busy)
                    # In turn, so a run of any length sees every kind it asks for.
                    kind = cfg.faults[len(faults) % len(cfg.faults)]
                    fault = FaultRecord(kind, p.index, now - start, streaming[p.index])
                    faults.append(fault)
                    if cfg.progress:
                        print(f"{now - start:7.1f} s fault {kind} on provider {p.index}",
                              flush=True)
                    cooldown[p.index] = now
                    progress.pending.append((fault, streaming[p.index]))
                    if kind == "kill":
                        p.signal(signal.SIGKILL)
                        await p.wait_exit()
                        payments.slot_of.pop(p.peer_id, None)
                        nursery.start_soon(restart, p)
                    elif kind == "stop":
                        p.signal(signal.SIGSTOP)
                        p.stopped = True
                        # Hung until well past the client's bound for the job it hit, so
                        # the client must give up on it (not merely see a slow frame).
                        hit = progress.pace.get(streaming[p.index])
                        nursery.start_soon(resume, p, (hit.bound() if hit else stall)
                                           + STOP_MARGIN_S)
                    else:
                        await client.host.get_network().close_peer(ID.from_base58(p.peer_id))

            async def refresh_adverts() -> None:
                while True:
                    await trio.sleep(ADVERT_REFRESH_S)
                    for p in providers:
                        if p.alive() and not p.stopped and p.peer_id in payments.slot_of:
                            with trio.move_on_after(DIAL_TIMEOUT_S):
                                try:
                                    await client.connect(p.addr)
                                except Exception:  # libp2p raises assorted types when a
                                    pass  # peer was faulted meanwhile; next round retries

            async def resume(p: Provider, after: float) -> None:
                await trio.sleep(after)
                p.signal(signal.SIGCONT)
                p.stopped = False

            async with trio.open_nursery() as nursery:
                for rec in jobs:
                    nursery.start_soon(one_job, rec)
                nursery.start_soon(chaos)
                nursery.start_soon(refresh_adverts)
                await done.wait()
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for p in providers:
                await p.stop()
    billing = [check_billing(channels[p.index], p.home, jobs, payments.ever.get(p.index, set()),
                             sum(f.kind == "kill" and f.provider == p.index for f in faults))
               for p in providers]
    return ChaosReport(cfg, stall, jobs, faults, billing, time.monotonic() - start)


def check_billing(
    channel: ClientChannel, home: Path, jobs: list[JobRecord], peers: set[str],
    kills: int = 0,
) -> dict[str, Any]:
    """Nothing billed twice on this channel, whose provider ran as ``peers`` (one peer id
    per start). Money moves only by vouchers, so the checks are on them:

    - the provider holds no voucher beyond what the client signed;
    - every nanoton the client signed is attributed to exactly one job of its ledger
      (the jobs may owe one credit window more: a cut job's debt, paid by the next; and
      one more per SIGKILL of the provider, see below);
    - each segment of a completed job cost at most its prompt (the user's prompt plus
      the text delivered before it, re-read after a failover) and the tokens it showed,
      and the segments together cost at most what the channel carries.

    The provider's own usage rows may count tokens that were in flight when the stream
    was cut; that excess is reported (`provider_overcount_tokens_max`), not failed.
    """
    with Ledger(home) as ledger:
        held = ledger.latest_voucher(channel.ref)
        provider_jobs = ledger.jobs(channel.ref)
    client_latest = channel.ledger.latest_voucher(channel.ref)
    client_sent = client_latest.voucher.sent if client_latest else 0
    provider_sent = held.voucher.sent if held else 0
    client_usage = channel.ledger.jobs(channel.ref)
    client_usage_cost = sum(u.cost for u in client_usage)
    problems: list[str] = []
    if provider_sent > client_sent:
        problems.append(f"provider holds {provider_sent}, client signed {client_sent}")
    # A job cut off inside its credit window owes those tokens; the client records the
    # debt and pays it with the channel's next voucher. So the jobs may carry more than
    # is signed, by at most one window (the debt left by the last job), never less.
    # A SIGKILLed provider loses the usage of the job it was serving (not yet on its
    # ledger), so after its restart it states a lower debt and extends a fresh window on
    # top: the client, which counts what it received, may then owe one window more per
    # kill until its next voucher pays all it counts. The provider bears that loss; the
    # client is never billed twice (debt >= 0).
    allowed_debt = PRICE.cost(0, CHAOS_WINDOW_TOKENS) * (1 + kills)
    debt = client_usage_cost - client_sent
    if not 0 <= debt <= allowed_debt:
        problems.append(f"client signed {client_sent}, attributes {client_usage_cost} to jobs")
    segments_cost = 0
    for job in jobs:
        if not job.ok:
            continue
        before = 0
        for peer, tokens, cost, _error in job.segments:
            if peer in peers:
                prompt_bound = prompt_token_bound(job.prompt) + MAX_TOKEN_BYTES * before
                bound = PRICE.cost(prompt_bound, tokens)
                if cost > bound:
                    problems.append(f"job {job.index}: {tokens} tokens cost {cost} > {bound}")
                segments_cost += cost
            before += tokens
    if segments_cost > client_usage_cost:
        problems.append(f"completed jobs' segments cost {segments_cost}, the ledger "
                        f"{client_usage_cost}")
    by_id = {u.job_id: u for u in client_usage}
    overcount = max(
        (u.completion_tokens - (by_id[u.job_id].completion_tokens if u.job_id in by_id else 0)
         for u in provider_jobs),
        default=0,
    )
    return {
        "channel": channel.channel_id,
        "client_signed": client_sent,
        "provider_holds": provider_sent,
        "client_jobs": len(client_usage),
        "provider_jobs": len(provider_jobs),
        "provider_billed": sum(u.cost for u in provider_jobs),
        "client_debt": debt,
        "allowed_debt": allowed_debt,
        "kills": kills,
        "provider_overcount_tokens_max": overcount,
        "ok": not problems,
        "problems": problems,
    }
