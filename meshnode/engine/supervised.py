"""The node's side of the engine runner: spawn it, talk to it, survive it.

``open_supervised_engine`` starts ``meshnode.engine.runner`` as a child process over a
socketpair and returns a ``SupervisedEngine`` (the ``Engine`` protocol). A supervisor
task owned by the caller's nursery watches the child:

- it exits or is killed (segfault, abort, OOM killer), or sends a frame we cannot parse:
  every job in flight fails with ``EngineUnavailable`` (the provider turns it into a
  typed ``engine_unavailable`` error and the client fails over), and the runner
  restarts after a backoff;
- it stops answering (no frame within ``stall_timeout_s`` although we ping it every
  ``PING_INTERVAL_S``): it is killed and handled as a crash;
- CRASH_LOOP_COUNT crashes within CRASH_LOOP_WINDOW_S withdraw the model: no more
  restarts, the node stays up (identity, ledger, channels) and logs why.

``state`` and ``on_state_change`` let the provider mark the model unavailable in its
advert while the runner is down.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from trio_typing import TaskStatus

from meshnode.core import runner_wire as wire
from meshnode.core.text import shown
from meshnode.engine.base import (
    EngineError,
    EngineUnavailable,
    FinishReason,
    InvalidRequest,
    InvalidSamplingParams,
    ModelInfo,
    PromptTooLong,
    SamplingParams,
    TokenChunk,
    Usage,
    check_prompt_size,
)
from meshnode.engine.model_file import check_model_file

log = logging.getLogger(__name__)
# llama.cpp's own log lines, from the runner's stderr: shown with the libraries' (-vv).
native_log = logging.getLogger("llama_cpp.native")

# How often the node pings the runner. The runner answers between two decode steps, so
# a healthy runner is never silent for longer than one step plus this interval.
PING_INTERVAL_S = 1.0
# A runner silent for this long is hung and gets killed. Its longest legitimate silence
# is one llama_decode call: a 512-token prompt slice. That takes ~0.5 s for Gemma 3 270M
# and ~10 s for a 7B Q4_K_M on a 4-core CPU (prefill ~50 tok/s); 30 s is 3x the slow
# case, and bounds how long a hung runner holds a client before its failover.
RUNNER_STALL_TIMEOUT_S = 30.0
# Hashing and loading a 70B GGUF from a slow disk takes minutes; a load that has not
# finished in 15 minutes will not.
RUNNER_LOAD_TIMEOUT_S = 900.0
# Restart backoff: the first restart is almost immediate (a one-off crash should cost
# clients little), doubling up to a cap so a broken machine is not hammered.
RESTART_BACKOFF_INITIAL_S = 0.5
RESTART_BACKOFF_MAX_S = 30.0
# A crash loop: this many crashes within the window means the model or the machine is
# broken (bad build, bad file, failing GPU); restarting forever would only fail jobs.
CRASH_LOOP_COUNT = 5
CRASH_LOOP_WINDOW_S = 600.0
# Acknowledge consumed chunks in groups: a quarter of the runner's 16-chunk window keeps
# it decoding without a frame back per token.
ACK_EVERY_CHUNKS = 4
# A request/response (count, bias) on a healthy runner takes milliseconds; tokenizing a
# 1 MiB prompt takes about a second on a slow CPU.
REQUEST_TIMEOUT_S = 30.0
# After asking a job to stop, wait this long for the runner to confirm (one decode step);
# past it the job is abandoned and the runner's own stall detection takes over.
CANCEL_CONFIRM_TIMEOUT_S = 10.0
# A runner that closed its socket is exiting; its status (the signal) is worth waiting for.
EXIT_GRACE_S = 2.0
# Exit on "bye" takes milliseconds; past this the runner is killed.
SHUTDOWN_TIMEOUT_S = 5.0
# The runner's stderr carries llama.cpp's own log; the tail is kept for crash reports.
STDERR_TAIL_BYTES = 4096
READ_BYTES = 1 << 16

ProgressCallback = Callable[[str, float], None]


class RunnerState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    WITHDRAWN = "withdrawn"
    CLOSED = "closed"


@dataclass
class RunnerConfig:
    model: Path
    n_ctx: int  # per job (sequence)
    slots: int = 1  # jobs decoded together in one batch
    n_gpu_layers: int = 0
    n_threads: int | None = None
    name: str | None = None
    stall_timeout_s: float = RUNNER_STALL_TIMEOUT_S
    load_timeout_s: float = RUNNER_LOAD_TIMEOUT_S
    backoff_initial_s: float = RESTART_BACKOFF_INITIAL_S
    backoff_max_s: float = RESTART_BACKOFF_MAX_S
    crash_loop_count: int = CRASH_LOOP_COUNT
    crash_loop_window_s: float = CRASH_LOOP_WINDOW_S
    cpuinfo: Path | None = None  # tests: another machine's /proc/cpuinfo
    assume_system_info: str | None = None  # tests: pretend llama.cpp has these features
    fault: str | None = None  # tests: --fault for the first runner (see runner.Fault)
    fault_every_start: bool = False  # tests: ... and for every restart too (a crash loop)
    check_memory: bool = True

    def argv(self, fd: int, model_id: str | None, first: bool) -> list[str]:
        args = [sys.executable, "-m", "meshnode.engine.runner", "--fd", str(fd),
                "--model", str(self.model), "--n-ctx", str(self.n_ctx),
                "--slots", str(self.slots),
                "--n-gpu-layers", str(self.n_gpu_layers)]
        if model_id:
            args += ["--model-id", model_id]
        if self.name:
            args += ["--name", self.name]
        if self.n_threads:
            args += ["--threads", str(self.n_threads)]
        if self.cpuinfo is not None:
            args += ["--cpuinfo", str(self.cpuinfo)]
        if self.assume_system_info is not None:
            args += ["--assume-system-info", self.assume_system_info]
        if self.fault and (first or self.fault_every_start):
            args += ["--fault", self.fault]
        return args


@dataclass
class _Pending:
    """A request waiting for its reply (count, bias)."""

    done: trio.Event = field(default_factory=trio.Event)
    value: Any = None
    error: BaseException | None = None


class _Job:
    def __init__(self, job_id: int) -> None:
        self.id = job_id
        # Bounded by the runner's flow-control window (16 chunks) plus the end marker.
        self.send, self.recv = trio.open_memory_channel[TokenChunk | BaseException | None](
            float("inf")
        )
        self.ended = trio.Event()
        self.finish_reason: FinishReason | None = None
        self.usage = Usage(0, 0)
        self.cached_tokens = 0  # prompt tokens the runner found in its KV cache
        self.unacked = 0

    def fail(self, exc: BaseException) -> None:
        if not self.ended.is_set():
            self.send.send_nowait(exc)
            self.ended.set()


class SupervisedGeneration:
    """The token stream of one job served by the runner (base.Generation)."""

    def __init__(self, engine: SupervisedEngine, job: _Job) -> None:
        self._engine = engine
        self._job = job

    def __aiter__(self) -> SupervisedGeneration:
        return self

    async def __anext__(self) -> TokenChunk:
        await self._engine._ack(self._job)
        item = await self._job.recv.receive()
        return self._take(item)

    def _take(self, item: TokenChunk | BaseException | None) -> TokenChunk:
        if item is None:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        self._job.unacked += 1
        return item

    def ready(self) -> list[TokenChunk]:
        out: list[TokenChunk] = []
        while True:
            try:
                item = self._job.recv.receive_nowait()
            except trio.WouldBlock:
                return out
            if not isinstance(item, TokenChunk):
                # The end (or an error) is for the next __anext__ to report. It is always
                # the last item of a job, so putting it back at the tail keeps the order.
                self._job.send.send_nowait(item)
                return out
            out.append(self._take(item))

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._job.finish_reason

    @property
    def usage(self) -> Usage:
        return self._job.usage

    @property
    def cached_tokens(self) -> int:
        return self._job.cached_tokens


class SupervisedEngine:
    """An Engine whose llama.cpp runs in a supervised child process."""

    def __init__(self, config: RunnerConfig, progress: ProgressCallback | None = None) -> None:
        self.config = config
        self.state = RunnerState.STARTING
        self.on_state_change: Callable[[RunnerState], None] | None = None
        self.restarts = 0
        self.crashes: deque[float] = deque()
        self.last_crash = ""
        self.plan = ""
        self.system_info = ""
        self.load_s = 0.0
        self.n_vocab = 0
        self.slots = config.slots
        self.pid: int | None = None
        self._info: ModelInfo | None = None
        self._stream: trio.SocketStream | None = None
        self._send_lock = trio.Lock()
        self._jobs: dict[int, _Job] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._last_rx = 0.0
        self._stderr_tail = bytearray()
        self._closing = False
        self._progress = progress  # load progress (hashing, loading) from the runner

    # ---- Engine protocol -------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        if self._info is None:
            raise EngineUnavailable("the model has not loaded yet")
        return self._info

    @property
    def available(self) -> bool:
        return self.state == RunnerState.READY

    @property
    def active_jobs(self) -> int:
        return len(self._jobs)

    @asynccontextmanager
    async def stream(
        self, prompt: str, params: SamplingParams, max_tokens: int
    ) -> AsyncIterator[SupervisedGeneration]:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be a positive integer, got {shown(max_tokens)}")
        check_prompt_size(prompt, self.info.n_ctx)  # before shipping it to the runner
        job = _Job(self._new_id())
        self._jobs[job.id] = job
        try:
            await self._send({"t": "gen", "id": job.id, "prompt": prompt,
                              "params": params.to_dict(), "max": max_tokens})
            yield SupervisedGeneration(self, job)
        finally:
            if not job.ended.is_set():
                with trio.CancelScope(shield=True):
                    try:
                        await self._send({"t": "cancel", "id": job.id})
                    except EngineUnavailable:
                        pass
                    with trio.move_on_after(CANCEL_CONFIRM_TIMEOUT_S):
                        await job.ended.wait()
            self._jobs.pop(job.id, None)

    async def count_tokens(self, text: str) -> int:
        """Counted by the runner on its tokenizer thread: running jobs do not wait."""
        check_prompt_size(text, self.info.n_ctx)
        value = await self._request({"t": "count_req", "text": text})
        return int(value)

    async def steady_logit_bias(self) -> dict[int, float]:
        """The runner's llama.steady_logit_bias (tests and benchmarks)."""
        value = await self._request({"t": "bias_req"})
        return {int(k): float(v) for k, v in value.items()}

    async def aclose(self) -> None:
        self._closing = True
        self._set_state(RunnerState.CLOSED)

    # ---- talking to the runner -------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    async def _send(self, msg: dict[str, Any]) -> None:
        stream = self._stream
        if stream is None or self.state != RunnerState.READY:
            raise EngineUnavailable(f"the engine runner is {self.state}"
                                    + (f" ({self.last_crash})" if self.last_crash else ""))
        frame = wire.encode(msg)
        try:
            async with self._send_lock:
                await stream.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise EngineUnavailable(f"the engine runner went away: {exc}") from None

    async def _request(self, msg: dict[str, Any]) -> Any:
        request_id = self._new_id()
        pending = self._pending[request_id] = _Pending()
        try:
            await self._send({**msg, "id": request_id})
            with trio.fail_after(REQUEST_TIMEOUT_S):
                await pending.done.wait()
        except trio.TooSlowError:
            raise EngineUnavailable("the engine runner did not answer in time") from None
        finally:
            self._pending.pop(request_id, None)
        if pending.error is not None:
            raise pending.error
        return pending.value

    async def _ack(self, job: _Job) -> None:
        if job.unacked >= ACK_EVERY_CHUNKS and not job.ended.is_set():
            n, job.unacked = job.unacked, 0
            try:
                await self._send({"t": "ack", "id": job.id, "n": n})
            except EngineUnavailable:
                pass  # the job's failure arrives through its channel

    def _dispatch(self, msg: dict[str, Any]) -> None:
        kind = msg["t"]
        if kind == "pong":
            return
        if kind == "chunk":
            job = self._jobs.get(msg["id"])
            if job is not None and not job.ended.is_set():
                if not msg["text"] or msg["n"] < 1:
                    raise wire.RunnerProtocolError("empty chunk")
                job.send.send_nowait(TokenChunk(msg["text"], msg["n"]))
        elif kind == "end":
            job = self._jobs.get(msg["id"])
            if job is not None and not job.ended.is_set():
                job.finish_reason = msg["reason"]
                job.usage = Usage(prompt_tokens=msg["prompt"],
                                  completion_tokens=msg["completion"])
                job.cached_tokens = msg["cached"]
                job.send.send_nowait(None)
                job.ended.set()
        elif kind == "err":
            exc = _runner_error(msg["kind"], msg["msg"])
            job = self._jobs.get(msg["id"])
            if job is not None:
                job.fail(exc)
            pending = self._pending.get(msg["id"])
            if pending is not None:
                pending.error = exc
                pending.done.set()
        elif kind == "count" and msg["id"] in self._jobs:  # a job's prompt, counted
            job = self._jobs[msg["id"]]
            job.usage = Usage(prompt_tokens=msg["n"], completion_tokens=0)
        elif kind in ("count", "bias"):
            pending = self._pending.get(msg["id"])
            if pending is not None:
                pending.value = msg["n"] if kind == "count" else msg["bias"]
                pending.done.set()
        elif kind == "progress":
            if self._progress is not None:
                self._progress(msg["stage"], msg["frac"])
        else:
            raise wire.RunnerProtocolError(f"unexpected {kind} from the runner")

    def _fail_all(self, reason: str) -> None:
        exc = EngineUnavailable(reason)
        for job in list(self._jobs.values()):
            job.fail(exc)
        for pending in self._pending.values():
            pending.error = exc
            pending.done.set()

    def _set_state(self, state: RunnerState) -> None:
        if state == self.state:
            return
        self.state = state
        if self.on_state_change is not None:
            self.on_state_change(state)

    # ---- supervision -----------------------------------------------------------------

    async def supervise(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                        ) -> None:
        """Run (and re-run) the runner until closed or withdrawn. Reports started once the
        first runner is loaded; if that first load fails, raises EngineError instead."""
        backoff = self.config.backoff_initial_s
        first = True
        while not self._closing:
            started_at = trio.current_time()
            try:
                reason = await self._run_once(first, task_status if first else None)
            except _LoadFailed as exc:
                if first:
                    raise EngineError(str(exc)) from None
                reason = str(exc)
            first = False
            if self._closing:
                break
            self._fail_all(f"the engine runner failed: {reason}")
            self.last_crash = reason
            now = time.monotonic()
            self.crashes.append(now)
            while self.crashes and now - self.crashes[0] > self.config.crash_loop_window_s:
                self.crashes.popleft()
            if len(self.crashes) >= self.config.crash_loop_count:
                log.error(
                    "model %s withdrawn: the engine runner failed %d times in %.0f s "
                    "(last: %s); the node keeps running. Check `meshnode doctor` and the "
                    "model file, then restart serve.",
                    self.config.model.name, len(self.crashes),
                    self.config.crash_loop_window_s, reason,
                )
                self._set_state(RunnerState.WITHDRAWN)
                return
            self._set_state(RunnerState.RESTARTING)
            if trio.current_time() - started_at > self.config.crash_loop_window_s:
                backoff = self.config.backoff_initial_s  # it ran well for a while
            log.warning("engine runner failed (%s); restarting in %.1f s", reason, backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.config.backoff_max_s)
            self.restarts += 1
        self._set_state(RunnerState.CLOSED)

    async def _run_once(self, first: bool,
                        task_status: TaskStatus[None] | None) -> str:
        """One runner's life; returns why it ended (raises _LoadFailed if it never
        loaded)."""
        parent_sock, child_sock = socket.socketpair()
        model_id = self._info.model_id if self._info is not None else None
        argv = self.config.argv(child_sock.fileno(), model_id, first)
        try:
            proc = await trio.lowlevel.open_process(
                argv, pass_fds=(child_sock.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            child_sock.close()
        self.pid = proc.pid
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(parent_sock))
        decoder = wire.FrameDecoder()
        self._stderr_tail.clear()
        reason = "stopped"
        ready = False
        # False while the node itself is what ends this runner (cancelled: Ctrl-C, SIGTERM):
        # then nobody reads its frames any more, and it is told to stop instead of mourned.
        runner_ended = False
        try:
            async with trio.open_nursery() as nursery:
                if proc.stderr is not None:
                    nursery.start_soon(self._drain_stderr, proc.stderr)
                try:
                    await self._await_hello(stream, decoder)
                except _LoadFailed as exc:
                    runner_ended = True
                    raise _LoadFailed(self._with_stderr(str(exc), proc)) from None
                self._stream = stream
                ready = True
                self._last_rx = trio.current_time()
                self._set_state(RunnerState.READY)
                if task_status is not None:
                    task_status.started()
                reason = await self._converse(stream, decoder)
                runner_ended = True
                nursery.cancel_scope.cancel()
        finally:
            self._stream = None
            if not runner_ended:  # a job waiting for its cancel to be confirmed stops now
                self._fail_all("the node is stopping")
            with trio.CancelScope(shield=True):
                await self._stop_process(proc, stream, hung=reason.startswith("hung"),
                                         stopping=not runner_ended, ready=ready)
        return self._with_stderr(reason, proc)

    async def _await_hello(self, stream: trio.SocketStream, decoder: wire.FrameDecoder
                           ) -> None:
        with trio.move_on_after(self.config.load_timeout_s) as scope:
            while True:
                data = await stream.receive_some(READ_BYTES)
                if not data:
                    raise _LoadFailed("the engine runner exited while loading the model")
                try:
                    msgs = decoder.feed(data)
                except wire.RunnerProtocolError as exc:
                    raise _LoadFailed(f"bad frame from the runner: {exc}") from None
                for msg in msgs:
                    if msg["t"] == "progress":
                        self._dispatch(msg)
                    elif msg["t"] == "fatal":
                        raise _LoadFailed(f"the model did not load: {msg['msg']}")
                    elif msg["t"] == "hello":
                        self._accept_hello(msg)
                        return
                    else:
                        raise _LoadFailed(f"the runner sent {msg['t']} before hello")
        if scope.cancelled_caught:
            raise _LoadFailed(f"the model did not load within {self.config.load_timeout_s:.0f} s")

    def _accept_hello(self, msg: dict[str, Any]) -> None:
        info = msg["info"]
        try:
            loaded = ModelInfo(
                model_id=str(info["model_id"]), name=str(info["name"]),
                quant=str(info["quant"]), n_ctx=int(info["n_ctx"]),
                path=self.config.model, chat_format=str(info["chat_format"]),
            )
            self.n_vocab = int(info["n_vocab"])
            self.slots = int(info["slots"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _LoadFailed(f"bad hello from the runner: {exc}") from None
        if self._info is not None and loaded.model_id != self._info.model_id:
            raise _LoadFailed("the model file changed on disk since the node started")
        self._info = loaded
        self.plan = msg["plan"]
        self.system_info = msg["sysinfo"]
        self.load_s = float(msg["load_s"])
        log.info("engine runner %s ready: %s in %.2f s (%s)", self.pid, loaded.name,
                 self.load_s, self.plan)

    async def _converse(self, stream: trio.SocketStream, decoder: wire.FrameDecoder) -> str:
        """Read frames and ping until the runner ends or stalls; returns why it ended."""
        outcome: list[str] = []

        async def read(cancel: trio.CancelScope) -> None:
            while True:
                try:
                    data = await stream.receive_some(READ_BYTES)
                except (trio.BrokenResourceError, OSError) as exc:
                    outcome.append(f"connection lost: {exc}")
                    break
                if not data:
                    outcome.append("the runner closed its end")
                    break
                self._last_rx = trio.current_time()
                try:
                    for msg in decoder.feed(data):
                        self._dispatch(msg)
                except wire.RunnerProtocolError as exc:
                    outcome.append(f"bad frame from the runner: {exc}")
                    break
            cancel.cancel()

        async def ping(cancel: trio.CancelScope) -> None:
            n = 0
            while True:
                await trio.sleep(PING_INTERVAL_S)
                silent = trio.current_time() - self._last_rx
                if silent > self.config.stall_timeout_s:
                    outcome.append(f"hung: no answer for {silent:.1f} s")
                    break
                n += 1
                try:
                    async with self._send_lock:
                        await stream.send_all(wire.encode({"t": "ping", "n": n}))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    outcome.append("connection lost while pinging")
                    break
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, nursery.cancel_scope)
            nursery.start_soon(ping, nursery.cancel_scope)
        return outcome[0] if outcome else "stopped"

    async def _stop_process(self, proc: trio.Process, stream: trio.SocketStream, *,
                            hung: bool = False, stopping: bool = False,
                            ready: bool = True) -> None:
        """`stopping`: the node ends this runner (its task was cancelled); a runner still
        loading cannot read "bye" and is killed at once."""
        closing = self._closing or stopping
        if proc.returncode is None and not closing and not hung:
            # It closed its socket: it is dying (a crash) and its exit status says how.
            with trio.move_on_after(EXIT_GRACE_S):
                await proc.wait()
        if proc.returncode is None and closing and (ready or not stopping):
            try:
                async with self._send_lock:
                    await stream.send_all(wire.encode({"t": "bye"}))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            with trio.move_on_after(SHUTDOWN_TIMEOUT_S):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await stream.aclose()

    async def _drain_stderr(self, pipe: trio.abc.ReceiveStream) -> None:
        while True:
            data = await pipe.receive_some(READ_BYTES)
            if not data:
                return
            self._stderr_tail += data
            del self._stderr_tail[:-STDERR_TAIL_BYTES]
            native_log.debug("runner %s: %s", self.pid,
                             wire.clip(data.decode("utf-8", "replace").rstrip(), 300))

    def _with_stderr(self, reason: str, proc: trio.Process) -> str:
        code = proc.returncode
        if code is not None and code < 0:
            try:
                reason += f" (killed by {signal.Signals(-code).name})"
            except ValueError:
                reason += f" (signal {-code})"
        elif code not in (None, 0):
            reason += f" (exit status {code})"
        tail = self._stderr_tail.decode("utf-8", "replace").strip().splitlines()[-3:]
        if tail:
            reason += "; runner stderr: " + wire.clip(" | ".join(tail), 300)
        return reason


class _LoadFailed(Exception):
    pass


def _runner_error(kind: str, msg: str) -> Exception:
    if kind == "too_long":
        return PromptTooLong(msg)
    if kind == "bad_params":
        return InvalidSamplingParams(msg)
    if kind == "invalid":
        return InvalidRequest(msg)
    return EngineError(msg)


@asynccontextmanager
async def open_supervised_engine(
    config: RunnerConfig, *, progress: ProgressCallback | None = None
) -> AsyncIterator[SupervisedEngine]:
    """Check the model file, start its runner and wait until it has loaded the model.

    Raises ModelFileError (bad file) or EngineError (the runner could not load it) before
    anything is advertised. On exit the runner is asked to stop, then killed.
    """
    await trio.to_thread.run_sync(check_model_file, config.model, config.check_memory)
    engine = SupervisedEngine(config, progress)
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.supervise)
        try:
            yield engine
        finally:
            engine._closing = True
            nursery.cancel_scope.cancel()
