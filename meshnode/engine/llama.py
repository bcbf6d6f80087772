"""The llama.cpp engine: one loaded GGUF, one generation at a time, cancellable per token.

llama.cpp contexts are not thread-safe, so decoding runs in a worker thread behind a
CapacityLimiter of one. Tokens cross into trio over a small memory channel; when the
consumer leaves the stream early the worker sees a flag between two tokens and stops.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp
import trio
from gguf import LlamaFileType
from llama_cpp import _internals as llama_internals

from meshnode.core.cpu_features import LoadPlan, cpu_flags, load_plan
from meshnode.core.text import shown
from meshnode.engine.base import (
    MAX_LOGIT_BIAS_ENTRIES,
    Engine,
    EngineError,
    FinishReason,
    InvalidRequest,
    InvalidSamplingParams,
    ModelInfo,
    PromptTooLong,
    SamplingParams,
    TokenChunk,
    Usage,
    chat_format_of,
    check_prompt_size,
)
from meshnode.engine.special_tokens import SpecialTokenBudget, special_texts
from meshnode.engine.textstream import TextAssembler

# How long leaving a stream waits for the decode thread to notice the cancel flag. One
# token takes milliseconds on a small model and ~100 ms on a 70B one on CPU; a prompt
# slice (PREFILL_SLICE_TOKENS) takes a few seconds at worst. Past this the thread is
# abandoned but keeps the generation slot, so the context is never used concurrently.
WORKER_STOP_TIMEOUT_S = 10.0
# Threads that tokenize prompts, beside the decode thread: tokenizing reads only the
# vocabulary (llama-server tokenizes in its HTTP threads too), so it need not wait for a
# generation, and one thread keeps a flood of prompts from taking every core.
TOKENIZER_THREADS = 1
# Chunks buffered between the decode thread and the consumer. Small, so a slow consumer
# (a congested stream) pauses decoding instead of piling text up in memory.
CHUNK_BUFFER = 16
# Prompt tokens evaluated per llama_decode call; also the granularity at which a cancel
# is noticed during prefill. 512 is llama.cpp's default batch and fits any context.
PREFILL_SLICE_TOKENS = 512
# Bytes read per step while hashing a model file: large enough to be I/O bound.
HASH_BLOCK_BYTES = 1 << 20
# No vocabulary piece is longer than this; llama_token_to_piece tells us if one is.
PIECE_BUFFER_BYTES = 256
# Strong enough to take a token out of the running, the maximum a peer may send too.
BANNED_LOGIT_BIAS = -100.0
# One llama_logit_bias in native layout: {int32_t token; float bias}, no padding.
_BIAS_ENTRY_FORMAT = "if"
_BIAS_ENTRY = struct.Struct("@" + _BIAS_ENTRY_FORMAT)

# llama-cpp-python's sampler chain wrapper is untyped; we call it as Any on purpose.
_LlamaSampler: Any = llama_internals.LlamaSampler

ProgressCallback = Callable[[str, float], None]
"""(stage, fraction done) — called from a worker thread, so it must be thread-safe
(rich's Progress.update is)."""


def sha256_file(path: Path, progress: ProgressCallback | None = None) -> str:
    """Hex sha256 of a file, read in blocks (blocking: run it in a thread)."""
    total = max(path.stat().st_size, 1)
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            digest.update(block)
            done += len(block)
            if progress is not None:
                progress("hashing", done / total)
    return digest.hexdigest()


def _quant_name(metadata: Mapping[str, str]) -> str:
    raw = metadata.get("general.file_type")
    try:
        name = LlamaFileType(int(raw)).name if raw is not None else "unknown"
    except ValueError:
        return f"type{raw}"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


@dataclass
class _Job:
    """What the decode thread needs, and what it reports back."""

    prompt_tokens: list[int]
    params: SamplingParams
    max_tokens: int
    send: trio.MemorySendChannel[TokenChunk]
    cancel: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    done: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=lambda: trio.CancelScope(shield=True))
    completion_tokens: int = 0


class LlamaGeneration:
    """The token stream of one request (see meshnode.engine.base.Generation)."""

    def __init__(self, recv: trio.MemoryReceiveChannel[TokenChunk], job: _Job) -> None:
        self._recv = recv
        self._job = job
        self._finish_reason: FinishReason | None = None
        self._error: BaseException | None = None

    def __aiter__(self) -> LlamaGeneration:
        return self

    async def __anext__(self) -> TokenChunk:
        try:
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._error is not None:
                raise EngineError(f"generation failed: {self._error}") from self._error
            raise StopAsyncIteration from None

    def ready(self) -> list[TokenChunk]:
        out: list[TokenChunk] = []
        while True:
            try:
                out.append(self._recv.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return out  # the end (or an error) is reported by the next __anext__

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._finish_reason

    @property
    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self._job.prompt_tokens),
            completion_tokens=self._job.completion_tokens,
        )


class LlamaEngine:
    """A GGUF model loaded once into llama.cpp; serves one generation at a time."""

    def __init__(self, llm: Any, info: ModelInfo) -> None:
        """Use ``await LlamaEngine.load(...)``; this wraps an already loaded model."""
        self._llm = llm
        self._info = info
        # One decode at a time: a llama.cpp context is not thread-safe. The thread holds
        # the token until it really ends, even if its waiter gave up on it.
        self._slot = trio.CapacityLimiter(1)
        self._tokenizer = trio.CapacityLimiter(TOKENIZER_THREADS)
        self._vocab = llm._model.vocab
        self._n_vocab: int = llm.n_vocab()
        self._add_bos: bool = bool(llm._model.add_bos_token())
        self._specials = SpecialTokenBudget(special_texts(self._vocab, self._n_vocab))
        self._decoded_total = 0
        self._closed = False

    @classmethod
    async def load(
        cls,
        path: Path,
        *,
        n_ctx: int,
        n_gpu_layers: int = 0,
        n_threads: int | None = None,
        progress: ProgressCallback | None = None,
        name: str | None = None,
        use_extra_bufts: bool | None = None,
    ) -> LlamaEngine:
        """Hash and load ``path`` in worker threads.

        use_extra_bufts: None applies this host's load plan (AMX guard, see
        meshnode.core.cpu_features); True/False forces it.

        n_gpu_layers: layers to offload on a CUDA build, -1 for all (ignored on CPU builds).
        n_threads: decode threads; None lets llama-cpp-python pick (half the cores).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        if n_ctx < 1:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        model_id = await trio.to_thread.run_sync(sha256_file, path, progress)
        if progress is not None:
            progress("loading", 0.0)
        loader = partial(
            load_llama,
            path,
            n_ctx=n_ctx,
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            use_extra_bufts=use_extra_bufts,
        )
        llm = await trio.to_thread.run_sync(loader)
        if progress is not None:
            progress("loading", 1.0)
        return cls(llm, model_info(llm, path, model_id, name))

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def available(self) -> bool:
        return not self._closed

    @property
    def busy(self) -> bool:
        """True while a decode thread holds the model (including an abandoned one)."""
        return self._slot.borrowed_tokens > 0

    @property
    def decoded_tokens_total(self) -> int:
        """Tokens sampled since load, across all generations (for metrics and tests)."""
        return self._decoded_total

    def tokenize(self, text: str) -> list[int]:
        """Prompt tokens for ``text``: BOS if the model wants one, special tokens parsed.

        Special tokens are parsed on purpose: a job's prompt is the model's whole input,
        chat template included (the client formats the chat, see ModelInfo.chat_format),
        and no provider text shares it, so a client writing `<start_of_turn>` forges
        nothing but its own conversation. Text from a third party must be escaped where
        the prompt is built (the API's chat formatting), not here. The parsing is
        quadratic in the special tokens found, so callers cap the size first
        (check_prompt_size), the special tokens are counted first (linear, refused past
        MAX_SPECIAL_TOKENS_PER_PROMPT) and it runs off the event loop."""
        self._check_open()
        self._specials.check(text)
        tokens: list[int] = self._llm.tokenize(
            text.encode("utf-8"), add_bos=self._add_bos, special=True
        )
        return tokens

    async def count_tokens(self, text: str) -> int:
        check_prompt_size(text, self._info.n_ctx)
        tokens = await trio.to_thread.run_sync(self.tokenize, text, limiter=self._tokenizer)
        return len(tokens)

    def prepare(self, prompt: str, params: SamplingParams, max_tokens: int) -> list[int]:
        """The prompt's tokens once the request is known to fit this model (typed errors
        otherwise): the checks every engine makes before decoding."""
        return checked_prompt(self.tokenize, self._n_vocab, self._info.n_ctx, prompt, params,
                              max_tokens)

    def token_piece(self, token: int) -> bytes:
        """The bytes a token stands for in generated text (no special-token text)."""
        return _token_piece(self._vocab, token, ctypes.create_string_buffer(PIECE_BUFFER_BYTES))

    @asynccontextmanager
    async def stream(
        self, prompt: str, params: SamplingParams, max_tokens: int
    ) -> AsyncIterator[LlamaGeneration]:
        check_prompt_size(prompt, self._info.n_ctx)
        prompt_tokens = await trio.to_thread.run_sync(
            self.prepare, prompt, params, max_tokens, limiter=self._tokenizer
        )
        send, recv = trio.open_memory_channel[TokenChunk](CHUNK_BUFFER)
        job = _Job(prompt_tokens=prompt_tokens, params=params, max_tokens=max_tokens, send=send)
        generation = LlamaGeneration(recv, job)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._run_job, job, generation)
                try:
                    yield generation
                finally:
                    await self._stop_job(job, recv)
        except BaseExceptionGroup as group:
            # _run_job never raises, so a group can only wrap the consumer's own exception
            # (or its cancellation). Hand that back unwrapped: callers should not need
            # except* because the engine happens to use a task internally.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    async def _stop_job(self, job: _Job, recv: trio.MemoryReceiveChannel[TokenChunk]) -> None:
        """Tell the decode thread to stop and wait (bounded) until it has."""
        job.cancel.set()
        if not job.started.is_set():
            # Still queued behind another generation: nothing touched the context, so
            # stop waiting for the slot now. (If the thread starts right now it sees the
            # cancel flag first thing, and holds the slot until it ends.)
            job.scope.cancel()
        # Closing our end makes a decode thread blocked on a full channel fail its send
        # at once instead of waiting for a reader that is gone.
        recv.close()
        deadline = trio.current_time() + WORKER_STOP_TIMEOUT_S
        with trio.CancelScope(deadline=deadline, shield=True):
            await job.done.wait()
        # Past the timeout: abandon the thread. It keeps the generation slot until it
        # really ends, so the context is still never used by two threads.
        job.scope.cancel()

    async def _run_job(self, job: _Job, generation: LlamaGeneration) -> None:
        reason: FinishReason = "cancelled"
        async with job.send:
            try:
                # Shielded: an outer cancellation must not abandon the thread while it may
                # still touch the context; only stream()'s exit decides to give up on it.
                with job.scope:
                    # trio-typing's stubs (pulled in by libp2p) predate abandon_on_cancel.
                    reason = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                        self._decode, job, limiter=self._slot, abandon_on_cancel=True
                    )
            except Exception as exc:
                generation._error = exc
            else:
                generation._finish_reason = reason
            finally:
                job.done.set()

    # ---- everything below runs in the decode thread --------------------------------

    def _decode(self, job: _Job) -> FinishReason:
        job.started.set()
        if self._closed:
            raise EngineError("engine is closed")
        decode = Decode(self, job.prompt_tokens, job.params, job.max_tokens)
        try:
            while not decode.finished:
                if job.cancel.is_set():
                    return "cancelled"
                before = decode.completion_tokens
                chunk = decode.step()
                job.completion_tokens = decode.completion_tokens
                self._decoded_total += decode.completion_tokens - before
                if chunk is not None and not self._send(job, chunk):
                    return "cancelled"
            return decode.finish_reason
        finally:
            decode.close()

    def _send(self, job: _Job, chunk: TokenChunk) -> bool:
        """Hand a chunk to trio, waiting while the buffer is full; False if nobody listens."""
        try:
            trio.from_thread.run(job.send.send, chunk)
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.RunFinishedError,
            trio.Cancelled,
        ):
            return False
        return True

    def _check_open(self) -> None:
        if self._closed:
            raise EngineError("engine is closed")

    async def __aenter__(self) -> LlamaEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def warm_up(self) -> None:
        """Decode one token so llama.cpp builds its compute graph now: otherwise the first
        client pays for it (about 0.6 s for Gemma 3 270M on a 2-core CPU)."""
        async with self.stream("Hello", SamplingParams(temperature=0.0), 1) as gen:
            async for _ in gen:
                pass

    async def aclose(self) -> None:
        """Free the model once no generation is using it."""
        if self._closed:
            return
        self._closed = True
        async with self._slot, self._tokenizer:
            await trio.to_thread.run_sync(self._llm.close)


def checked_prompt(
    tokenize: Callable[[str], list[int]], n_vocab: int, n_ctx: int, prompt: str,
    params: SamplingParams, max_tokens: int,
) -> list[int]:
    """Tokenize ``prompt`` once the request is known to fit a model with ``n_vocab`` tokens
    and a context of ``n_ctx`` (typed errors otherwise). Shared by every engine."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be a positive integer, got {shown(max_tokens)}")
    bad = sorted(t for t in params.logit_bias if t >= n_vocab)
    if bad:
        raise InvalidSamplingParams(
            f"logit_bias names token ids outside the vocabulary (size {n_vocab}): {bad[:5]}"
        )
    check_prompt_size(prompt, n_ctx)
    tokens = tokenize(prompt)
    if not tokens:
        raise InvalidRequest("the prompt is empty and this model adds no BOS token")
    if len(tokens) >= n_ctx:
        raise PromptTooLong(
            f"prompt is {len(tokens)} tokens; the context holds {n_ctx} including the output"
        )
    return tokens


class Decode:
    """One generation on a loaded model, advanced one llama_decode call at a time.

    Synchronous and single-threaded: the in-process engine drives it from its decode
    thread, the runner process from its scheduler loop. Each ``step()`` evaluates one
    prompt slice (at most PREFILL_SLICE_TOKENS) or samples one token, so whoever drives
    it can look at cancels and pings between steps.
    """

    def __init__(
        self, engine: LlamaEngine, prompt_tokens: list[int], params: SamplingParams,
        max_tokens: int,
    ) -> None:
        self._llm = engine._llm
        self._vocab = engine._vocab
        self._n_ctx = engine.info.n_ctx
        self._tokens = prompt_tokens
        self._max_tokens = max_tokens
        self._sampler = _make_sampler(engine._llm, engine._n_vocab, params)
        self._assembler = TextAssembler(params.stop)
        self._buf = ctypes.create_string_buffer(PIECE_BUFFER_BYTES)
        self._next_prefill = self._reuse_prefix()
        self.completion_tokens = 0
        self.finished = False
        self.finish_reason: FinishReason = "cancelled"
        self._tail_pending = False
        self._last_token: int | None = None

    @property
    def prefilling(self) -> bool:
        return self._next_prefill < len(self._tokens)

    def _reuse_prefix(self) -> int:
        """Where prefill starts: after the longest prefix already in the KV cache."""
        llm = self._llm
        keep = 0
        if getattr(llm, "_is_recurrent", False) or getattr(llm, "_is_hybrid", False):
            llm.reset()  # recurrent state cannot be rolled back to a prefix
        else:
            for a, b in zip(llm._input_ids[: llm.n_tokens].tolist(), self._tokens,
                            strict=False):
                if a != b:
                    break
                keep += 1
        # Re-evaluate at least the last prompt token so fresh logits exist to sample from.
        keep = min(keep, len(self._tokens) - 1)
        llm.n_tokens = keep  # Llama.eval drops KV entries past n_tokens before decoding
        return keep

    def step(self) -> TokenChunk | None:
        """Do one unit of work; return text that became safe to release, if any."""
        if self.finished:
            return None
        llm = self._llm
        if self.prefilling:
            start = self._next_prefill
            llm.eval(self._tokens[start : start + PREFILL_SLICE_TOKENS])
            self._next_prefill = start + PREFILL_SLICE_TOKENS
            return None
        if self._tail_pending:
            return self._end(self.finish_reason, self._assembler.finish())
        if self._last_token is not None:
            # Evaluate the previous token only now, so its text went out before this work.
            llm.eval([self._last_token])
            self._last_token = None
        token = int(self._sampler.sample(llm._ctx, -1))
        if llama_cpp.llama_vocab_is_eog(self._vocab, token):
            return self._end("stop", self._assembler.finish())
        self.completion_tokens += 1
        chunk = self._assembler.feed(_token_piece(self._vocab, token, self._buf))
        if self._assembler.stopped:
            return self._end("stop", chunk)
        if self.completion_tokens >= self._max_tokens or llm.n_tokens + 1 >= self._n_ctx:
            self.finish_reason = "length"
            self._tail_pending = True  # release held-back text on the next step
            return chunk
        self._last_token = token
        return chunk

    def _end(self, reason: FinishReason, chunk: TokenChunk | None) -> TokenChunk | None:
        self.finished = True
        self.finish_reason = reason
        return chunk

    def close(self) -> None:
        self._sampler.close()


def _make_sampler(llm: Any, n_vocab: int, params: SamplingParams) -> Any:
    # The order llama.cpp's own samplers use: bias and penalties on raw logits, then
    # truncation, temperature and the draw.
    sampler = _LlamaSampler()
    if params.logit_bias:
        entries = _bias_array(params.logit_bias)
        llama_cpp.llama_sampler_chain_add(
            sampler.sampler,
            llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(entries), entries),
        )
    if params.repeat_penalty != 1.0:
        sampler.add_penalties(
            n_vocab=n_vocab,
            penalty_last_n=llm.last_n_tokens_size,
            penalty_repeat=params.repeat_penalty,
            penalty_freq=0.0,
            penalty_present=0.0,
        )
    if params.temperature == 0.0:
        sampler.add_greedy()
    else:
        if params.top_k > 0:
            sampler.add_top_k(params.top_k)
        sampler.add_top_p(params.top_p, 1)
        sampler.add_temp(params.temperature)
        seed = llama_cpp.LLAMA_DEFAULT_SEED if params.seed is None else params.seed
        sampler.add_dist(seed)
    return sampler


def _bias_array(bias: Mapping[int, float]) -> ctypes.Array[Any]:
    """The bias as llama.cpp's ``llama_logit_bias[]`` (it copies the array).

    Packed in one struct call: llama-cpp-python's ``add_logit_bias`` sets two ctypes
    fields per entry in Python, ~0.2 ms for a 300-entry bias before each first token."""
    entry = llama_cpp.llama_logit_bias
    assert ctypes.sizeof(entry) == _BIAS_ENTRY.size  # {int32 token; float bias}
    packed = _BIAS_ENTRY_FORMAT * len(bias)
    flat = [x for pair in bias.items() for x in pair]
    return (entry * len(bias)).from_buffer_copy(struct.pack(packed, *flat))


def system_info() -> str:
    """llama.cpp's compiled-in features ("CPU : SSE3 = 1 | AVX2 = 1 | ... |")."""
    raw = llama_cpp.llama_print_system_info()
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def host_load_plan(cpuinfo_path: Path = Path("/proc/cpuinfo"),
                   build_info: str | None = None) -> LoadPlan:
    """The AMX guard for this host and this llama.cpp build (see core.cpu_features)."""
    try:
        cpuinfo = cpuinfo_path.read_text()
    except OSError:
        cpuinfo = ""
    return load_plan(cpu_flags(cpuinfo), system_info() if build_info is None else build_info)


def load_llama(
    path: Path, *, n_ctx: int, n_gpu_layers: int = 0, n_threads: int | None = None,
    use_extra_bufts: bool | None = None,
) -> Any:
    """Load a GGUF into llama_cpp.Llama (blocking) with this host's safe load plan.

    ``Llama()`` does not expose ``use_extra_bufts``; it takes its model params from
    ``llama_model_default_params()``, so while it loads we hand it defaults with the
    field set. Loading happens once per process, before any other thread uses llama_cpp.
    """
    if use_extra_bufts is None:
        use_extra_bufts = host_load_plan().use_extra_bufts
    module: Any = llama_cpp.llama_cpp
    original = module.llama_model_default_params

    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = use_extra_bufts
        return params

    module.llama_model_default_params = defaults
    try:
        return llama_cpp.Llama(
            str(path),
            n_ctx=n_ctx,
            n_batch=min(n_ctx, PREFILL_SLICE_TOKENS),
            n_gpu_layers=n_gpu_layers,
            n_threads=n_threads,
            verbose=False,
        )
    except ValueError as exc:
        raise EngineError(f"llama.cpp could not load {path}: {exc}") from exc
    finally:
        module.llama_model_default_params = original


def model_info(llm: Any, path: Path, model_id: str, name: str | None = None) -> ModelInfo:
    metadata: Mapping[str, str] = llm.metadata
    return ModelInfo(
        model_id=model_id,
        name=name or metadata.get("general.name") or path.stem,
        quant=_quant_name(metadata),
        n_ctx=int(llm.n_ctx()),
        path=path,
        chat_format=chat_format_of(metadata.get("tokenizer.chat_template")),
    )


def _token_piece(vocab: Any, token: int, buf: ctypes.Array[ctypes.c_char]) -> bytes:
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    if n < 0:  # buffer too small: -n is the size needed
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, False)
    return buf.raw[:n]


def steady_logit_bias(target: LlamaEngine | Any) -> dict[int, float]:
    """Bias that bans byte-fallback, unknown, BOS and end-of-generation tokens.

    With it every sampled token of a SentencePiece-style model prints as text and
    generation never ends early, so tests and benchmarks on a random-weight model get a
    steady, countable stream. Accepts a LlamaEngine or a llama_cpp.Llama.
    """
    llm = target._llm if isinstance(target, LlamaEngine) else target
    return steady_bias_for(llm._model.vocab, llm.n_vocab(), llm.token_bos())


def steady_bias_for(vocab: Any, n_vocab: int, bos: int) -> dict[int, float]:
    """steady_logit_bias for a vocabulary handle (any engine's)."""
    unwanted = llama_cpp.LLAMA_TOKEN_ATTR_BYTE | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    banned = {
        t
        for t in range(n_vocab)
        if llama_cpp.llama_vocab_get_attr(vocab, t) & unwanted
        or llama_cpp.llama_vocab_is_eog(vocab, t)
    }
    if bos >= 0:
        banned.add(bos)
    if len(banned) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(
            f"this vocabulary has {len(banned)} byte/control tokens, more than a request "
            f"may bias ({MAX_LOGIT_BIAS_ENTRIES})"
        )
    return {t: BANNED_LOGIT_BIAS for t in sorted(banned)}


if TYPE_CHECKING:

    def _satisfies_engine_protocol(engine: LlamaEngine) -> Engine:
        return engine  # mypy fails here if LlamaEngine drifts from the Engine protocol
