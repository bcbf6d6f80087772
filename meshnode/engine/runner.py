"""The engine runner: a child process that owns one llama.cpp model (the Ollama pattern).

    python -m meshnode.engine.runner --fd N --model PATH --n-ctx 4096 [...]

The node spawns it with one end of a socketpair and talks ``core.runner_wire`` over it.
Everything native (loading, decoding, tokenizing) happens here, so a segfault, abort,
OOM kill or hang in llama.cpp costs the node one restart, never its identity, gossip or
payment ledger, and decoding never holds the node's GIL.

One loop, one thread: read whatever commands arrived (without blocking while there is
work), then do one batched step (engine.batched: the next token of every running job
plus a slice of a prompt being read). So a cancel, a ping or a new job is seen within
one llama_decode call. Counting a prompt's tokens (`count_req`, asked before a job is
paid for) runs on a tokenizer thread instead, so a stranger's long prompt never pauses
the running jobs; the tokens it found are kept for that prompt's `gen`.
Up to --slots jobs run together, the rest wait in arrival order;
each may have at most CHUNK_WINDOW chunks the node has not consumed yet (flow control:
a paused consumer pauses its own sequence, as the in-process engine's bounded channel
did, while the others keep decoding).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import ctypes
import os
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshnode.core import runner_wire as wire
from meshnode.engine.base import (
    EngineError,
    InvalidRequest,
    InvalidSamplingParams,
    PromptTooLong,
    SamplingParams,
    check_prompt_size,
)

# Chunks a job may have in flight to the node before its decode pauses: the same buffer
# the in-process engine had (llama.CHUNK_BUFFER), so a stalled consumer (a client that
# has not paid) stops decoding within a few tokens.
CHUNK_WINDOW = 16
# Bytes read from the socket per call: a prompt frame (≤ 1 MiB) arrives in a few reads.
READ_BYTES = 1 << 20
# Progress frames while hashing/loading: at most this often, so a fast disk does not
# turn a progress bar into thousands of frames.
PROGRESS_EVERY_S = 0.1
# Exit codes the supervisor reads: the model could not be loaded (do not restart in a
# loop for a bad file) versus everything else.
EXIT_LOAD_FAILED = 3
# How often the runner checks that its node is still alive (see _die_with_parent).
PARENT_CHECK_S = 1.0
# Threads that count prompt tokens beside the decode loop: one, so a flood of prompts
# takes one core at most (tokenizing reads only the vocabulary, safe beside decoding).
TOKENIZER_THREADS = 1
# Counted prompts whose tokens are kept for their `gen`: a provider's slots plus its
# queue, with room. A prompt pushed out is tokenized again at admission (bounded work).
MAX_COUNTED_PROMPTS = 16
# Tests and the market scenario emulate providers of different speeds on one CPU: at most
# this many decode steps per second (tokens per second per job). Unset in production.
PACE_ENV = "MESHNODE_RUNNER_PACE_TOK_S"


@dataclass
class Fault:
    """Test-only failure injection (``--fault KIND:N``): after N sampled tokens, abort
    (SIGABRT), segv (SIGSEGV), exit (status 1) or hang (stop reading and writing)."""

    kind: str
    after_tokens: int

    @classmethod
    def parse(cls, spec: str | None) -> Fault | None:
        if not spec:
            return None
        kind, _, n = spec.partition(":")
        if kind not in ("abort", "segv", "exit", "hang") or not n.isdigit():
            raise SystemExit(f"--fault must be abort|segv|exit|hang:N, got {spec!r}")
        return cls(kind, int(n))

    def maybe_fire(self, tokens_so_far: int) -> None:
        if tokens_so_far < self.after_tokens:
            return
        if self.kind == "abort":
            os.abort()
        if self.kind == "segv":
            ctypes.string_at(0)  # reads address 0: SIGSEGV, like a native crash
        if self.kind == "exit":
            os._exit(1)
        while True:  # hang: alive, silent, deaf
            time.sleep(3600)


@dataclass
class _Job:
    id: int
    prompt_tokens: list[int]
    params: SamplingParams
    max_tokens: int
    seq: Any = None  # batched.Sequence once it has a slot
    in_flight: int = 0  # chunks sent that the node has not acknowledged
    first_sent: bool = False


@dataclass
class Runner:
    sock: socket.socket
    model: Any  # batched.BatchedModel (imported lazily: llama_cpp is slow to import)
    fault: Fault | None = None
    queue: collections.deque[_Job] = field(default_factory=collections.deque)
    active: dict[int, _Job] = field(default_factory=dict)
    decoder: wire.FrameDecoder = field(default_factory=wire.FrameDecoder)
    running: bool = True
    # The tokenizer thread sends too: one frame at a time on the socket.
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    tokenizer: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(
            TOKENIZER_THREADS, thread_name_prefix="tokenize"))
    counted: dict[str, list[int]] = field(default_factory=dict)  # prompt -> its tokens
    counted_lock: threading.Lock = field(default_factory=threading.Lock)
    pace_tok_s: float | None = None  # PACE_ENV: decode steps per second at most
    _next_step_at: float = 0.0

    # Frames the loop produced this turn, written together by flush() (loop thread only).
    outbox: list[bytes] = field(default_factory=list)
    yield_after_flush: bool = False  # the outbox holds a job's first chunk

    def send(self, msg: dict[str, Any]) -> None:
        """Queue a frame; the loop writes a turn's frames in one sendall before it waits
        or decodes again: a prompt's count and its first chunk, or a batched step's
        chunks, wake the node once instead of once a frame."""
        self.outbox.append(wire.encode(msg))

    def flush(self) -> None:
        if self.outbox:
            data = b"".join(self.outbox)
            self.outbox.clear()
            with self.send_lock:
                self.sock.sendall(data)
        if self.yield_after_flush:
            self.yield_after_flush = False
            # A socket write wakes the node "in sync": Linux may queue it on this CPU
            # even when another is idle, behind our next decode step. Giving the CPU up
            # once lets a job's first token reach it at once (measured on 2 cores: the
            # chunk sat 0.1-1.5 ms in the node's socket without this, ~0.1 ms with it);
            # with nothing else queued here the call returns at once.
            _sched_yield()

    def send_now(self, msg: dict[str, Any]) -> None:
        """Write one frame at once (the tokenizer thread's answers)."""
        frame = wire.encode(msg)
        with self.send_lock:
            self.sock.sendall(frame)

    # ---- commands ------------------------------------------------------------------

    def poll(self, block: bool) -> None:
        """Read and handle the commands that have arrived (waiting for one if block)."""
        ready, _, _ = select.select([self.sock], [], [], None if block else 0)
        if not ready:
            return
        data = self.sock.recv(READ_BYTES)
        if not data:  # the node is gone: nothing left to serve
            self.running = False
            return
        for msg in self.decoder.feed(data):
            self.handle(msg)

    def handle(self, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == "ping":
            self.send({"t": "pong", "n": msg["n"]})
        elif kind == "gen":
            self.admit(msg)
        elif kind == "ack":
            job = self.active.get(msg["id"])
            if job is not None:
                job.in_flight = max(0, job.in_flight - msg["n"])
        elif kind == "cancel":
            self.cancel(msg["id"])
        elif kind == "count_req":
            self.count(msg["id"], msg["text"])
        elif kind == "bias_req":
            self.send({"t": "bias", "id": msg["id"], "bias": self.model.steady_logit_bias()})
        elif kind == "bye":
            self.running = False
        else:
            raise wire.RunnerProtocolError(f"the runner does not accept {kind}")

    def admit(self, msg: dict[str, Any]) -> None:
        with self.counted_lock:
            counted = self.counted.pop(msg["prompt"], None)
        try:
            params = SamplingParams.from_dict(msg["params"])
            tokens = self.model.prepare(msg["prompt"], params, msg["max"], tokens=counted)
        except PromptTooLong as exc:
            self._error(msg["id"], "too_long", exc)
        except InvalidSamplingParams as exc:
            self._error(msg["id"], "bad_params", exc)
        except (InvalidRequest, ValueError) as exc:
            self._error(msg["id"], "invalid", exc)
        else:
            # The prompt's count before its first token: a provider that did not ask for
            # it up front (a free job) learns it here.
            self.send({"t": "count", "id": msg["id"], "n": len(tokens)})
            self.queue.append(_Job(msg["id"], tokens, params, msg["max"]))

    def count(self, job_id: int, text: str) -> None:
        """Count on the tokenizer thread; the answer is sent from there."""
        self.tokenizer.submit(self._count, job_id, text)

    def _count(self, job_id: int, text: str) -> None:  # on the tokenizer thread
        try:
            check_prompt_size(text, self.model.n_ctx)
            tokens = self.model.tokenize(text)
        except PromptTooLong as exc:
            self._error(job_id, "too_long", exc, now=True)
        except (EngineError, ValueError, RuntimeError) as exc:
            self._error(job_id, "engine", exc, now=True)
        else:
            with self.counted_lock:
                self.counted[text] = tokens
                while len(self.counted) > MAX_COUNTED_PROMPTS:
                    del self.counted[next(iter(self.counted))]  # the oldest
            self.send_now({"t": "count", "id": job_id, "n": len(tokens)})

    def cancel(self, job_id: int) -> None:
        job = self.active.get(job_id)
        if job is not None:
            self._finish(job, "cancelled")
            return
        for queued in self.queue:
            if queued.id == job_id:
                self.queue.remove(queued)
                self._end(queued, "cancelled", 0)
                return

    def _error(self, job_id: int, kind: str, exc: BaseException, *, now: bool = False
               ) -> None:
        """`now`: from the tokenizer thread, which writes at once (the outbox is the
        loop's)."""
        msg = {"t": "err", "id": job_id, "kind": kind, "msg": wire.clip(str(exc))}
        (self.send_now if now else self.send)(msg)

    # ---- decoding ------------------------------------------------------------------

    def _start_queued(self) -> None:
        while self.queue and self.model.free_slots:
            job = self.queue.popleft()
            job.seq = self.model.admit(job.id, job.prompt_tokens, job.params, job.max_tokens)
            self.active[job.id] = job

    def _runnable(self) -> list[_Job]:
        return [j for j in self.active.values() if j.in_flight < CHUNK_WINDOW]

    @property
    def has_work(self) -> bool:
        """True when a step can be taken now (so polling must not block)."""
        return bool(self._runnable()) or (bool(self.queue) and self.model.free_slots > 0)

    def step(self) -> None:
        self._start_queued()
        jobs = self._runnable()
        if not jobs:
            return
        by_seq = {id(j.seq): j for j in jobs}
        self._pace()
        try:
            results = self.model.step([j.seq for j in jobs])
        except EngineError as exc:  # llama.cpp reported a failure (not a crash)
            for job in jobs:
                self._error(job.id, "engine", exc)
                self._finish(job, None)
            return
        for seq, chunk in results:
            job = by_seq[id(seq)]
            if chunk is not None:
                if not job.first_sent:
                    job.first_sent = self.yield_after_flush = True
                job.in_flight += 1
                self.send({"t": "chunk", "id": job.id, "text": chunk.text,
                           "n": chunk.n_tokens})
            if seq.finished:
                self._finish(job, seq.finish_reason)
        if self.fault is not None:
            self.flush()  # what was decoded reaches the node before the fault fires
            self.fault.maybe_fire(self.model.decoded_total)

    def _pace(self) -> None:
        """Sleep until the next step is due under ``pace_tok_s`` (at most one step's
        interval, so commands are still read every 1/pace seconds)."""
        if not self.pace_tok_s:
            return
        now = time.monotonic()
        if self._next_step_at > now:
            self.flush()  # answers (pongs, errors) do not wait out the pause
            time.sleep(self._next_step_at - now)
        self._next_step_at = max(now, self._next_step_at) + 1.0 / self.pace_tok_s

    def _finish(self, job: _Job, reason: str | None) -> None:
        completion = job.seq.completion_tokens if job.seq is not None else 0
        if job.seq is not None:
            self.model.release(job.seq)
        self.active.pop(job.id, None)
        if reason is not None:
            self._end(job, reason, completion)

    def _end(self, job: _Job, reason: str, completion: int) -> None:
        cached = job.seq.reused_tokens if job.seq is not None else 0
        self.send({"t": "end", "id": job.id, "reason": reason,
                   "prompt": len(job.prompt_tokens), "completion": completion,
                   "cached": cached})

    def serve(self) -> None:
        try:
            while self.running:
                self.poll(block=not self.has_work)
                if self.running and self.has_work:
                    self.step()
                self.flush()
        finally:
            self.tokenizer.shutdown(wait=False, cancel_futures=True)


def _sched_yield() -> None:
    if hasattr(os, "sched_yield"):  # Unix; elsewhere the write's wake-up is left as is
        os.sched_yield()


def _progress_sender(sock: socket.socket) -> Any:
    last = [0.0]

    def progress(stage: str, frac: float) -> None:
        now = time.monotonic()
        if frac < 1.0 and now - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = now
        sock.sendall(wire.encode({"t": "progress", "stage": stage, "frac": float(frac)}))

    return progress


def _die_with_parent() -> None:
    """Exit when the node that spawned us is gone, so a SIGKILLed node never leaves a
    runner holding gigabytes of model behind. Socket EOF tells us too, but only once we
    next read (not while loading a model). PR_SET_PDEATHSIG cannot be used: it fires when
    the spawning *thread* exits, and trio spawns processes from a worker thread."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_S)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def load_model(args: argparse.Namespace, sock: socket.socket) -> tuple[Any, str, str, float]:
    """Load the model as asked; (model, load plan reason, llama.cpp system info, seconds)."""
    from meshnode.engine.batched import BatchedModel
    from meshnode.engine.llama import host_load_plan, sha256_file, system_info

    started = time.monotonic()
    path = Path(args.model)
    progress = _progress_sender(sock)
    model_id = args.model_id or sha256_file(path, progress)
    sysinfo = args.assume_system_info if args.assume_system_info is not None else system_info()
    plan = host_load_plan(Path(args.cpuinfo), sysinfo)
    progress("loading", 0.0)
    model = BatchedModel(path, n_ctx=args.n_ctx, n_slots=args.slots,
                         n_gpu_layers=args.n_gpu_layers, n_threads=args.threads,
                         use_extra_bufts=plan.use_extra_bufts, model_id=model_id,
                         name=args.name)
    progress("loading", 1.0)
    model.warm_up()
    return model, plan.reason, system_info(), time.monotonic() - started


def _pace_from_env() -> float | None:
    raw = os.environ.get(PACE_ENV)
    if not raw:
        return None
    try:
        pace = float(raw)
    except ValueError:
        pace = 0.0
    if not 0 < pace < float("inf"):
        raise SystemExit(f"{PACE_ENV} must be a positive number of tokens per second")
    return pace


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="meshnode-runner", description=__doc__)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-id", default=None, help="skip hashing: the known sha256")
    parser.add_argument("--name", default=None)
    parser.add_argument("--n-ctx", type=int, required=True, help="context per sequence")
    parser.add_argument("--slots", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--n-gpu-layers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpuinfo", default="/proc/cpuinfo",
                        help="where to read CPU flags (tests feed an AMX machine's)")
    parser.add_argument("--assume-system-info", default=None,
                        help="tests: pretend llama.cpp reports these compiled features")
    parser.add_argument("--fault", default=None, help="tests only: KIND:N (see Fault)")
    args = parser.parse_args(argv)

    _die_with_parent()
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    try:
        model, plan, sysinfo, load_s = load_model(args, sock)
    except (EngineError, OSError, ValueError) as exc:
        sock.sendall(wire.encode({"t": "fatal", "msg": wire.clip(str(exc))}))
        return EXIT_LOAD_FAILED
    info = model.info
    sock.sendall(wire.encode({
        "t": "hello",
        "info": {"model_id": info.model_id, "name": info.name, "quant": info.quant,
                 "n_ctx": info.n_ctx, "chat_format": info.chat_format,
                 "n_vocab": model.n_vocab, "slots": model.n_slots},
        "plan": plan, "sysinfo": sysinfo, "load_s": float(load_s),
    }))
    runner = Runner(sock, model, Fault.parse(args.fault), pace_tok_s=_pace_from_env())
    try:
        runner.serve()
    except (BrokenPipeError, ConnectionResetError):
        return 0  # the node went away mid-send
    except wire.RunnerProtocolError as exc:
        print(f"meshnode runner: bad frame from the node: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Skip interpreter teardown (and llama.cpp's destructors) on the way out: the OS frees
    # the model faster, and a native destructor cannot crash an exit we already decided.
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
