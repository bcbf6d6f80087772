"""Continuous batching: many jobs share one llama.cpp context, one llama_decode per step.

What the engine runner runs (synchronous, single-threaded; the runner's loop drives it):

- each job is a *sequence* with its own seq id (a slot), KV cells, sampler chain and
  text assembler; sampling stays per sequence exactly as in the single-job engine
  (greedy, temperature, top-k, top-p, seed, logit bias, penalties, stop strings);
- one ``step()`` builds one ``llama_batch``: the next token of every decoding sequence,
  then prompt tokens of sequences still prefilling; new jobs join between steps;
- prompts are prefilled in chunks: while other sequences decode, a step takes at most
  PREFILL_CHUNK_WHILE_DECODING prompt tokens, so a long prompt does not stall them;
- a finished or cancelled sequence frees its slot at once; its KV cells stay, so the
  next job whose prompt shares a prefix (a system prompt, a conversation) reuses them,
  from its own slot or copied from any other slot (``llama_memory_seq_cp``; the KV cache
  is unified, so a copied prefix shares cells instead of duplicating them).

llama.cpp is not batch-invariant: the same greedy request can give different text alone
and in a batch on real models, because matmul reductions run in another order. The
tests check equality where it holds (the tiny F32 model) and measure the difference on
Gemma in bench/batching.py.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
from llama_cpp import _internals as llama_internals

from meshnode.engine.base import (
    EngineError,
    FinishReason,
    ModelInfo,
    SamplingParams,
    TokenChunk,
    chat_format_of,
)
from meshnode.engine.llama import (
    PIECE_BUFFER_BYTES,
    _make_sampler,
    _quant_name,
    _token_piece,
    checked_prompt,
    steady_bias_for,
)
from meshnode.engine.special_tokens import SpecialTokenBudget, special_texts
from meshnode.engine.textstream import TextAssembler

# Tokens per llama_decode call (llama.cpp's default n_batch): prompt slices fill it.
N_BATCH = 512
# Prompt tokens a step may take while other sequences are decoding. A step's time grows
# with its tokens; 64 prompt tokens cost about as much as a few decode steps of a small
# batch on CPU, so running streams see at most a few times their usual inter-token gap
# while a long prompt is read (tests/test_batching.py measures the bound).
PREFILL_CHUNK_WHILE_DECODING = 64


@dataclass
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what its KV cells hold, in order
    busy: bool = False


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Sequence:
    """One job inside the batch."""

    def __init__(self, job_id: int, slot: _Slot, prompt: list[int], keep: int,
                 params: SamplingParams, max_tokens: int, sampler: Any) -> None:
        self.job_id = job_id
        self.slot = slot
        self.prompt_len = len(prompt)
        self.pending = prompt[keep:]  # tokens to evaluate next (prompt, then last sampled)
        self.prefilling = True
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.assembler = TextAssembler(params.stop)
        self.completion_tokens = 0
        self.finished = False
        self.finish_reason: FinishReason = "cancelled"
        self.tail_pending = False
        self.reused_tokens = keep


class BatchedModel:
    """A GGUF loaded once; up to ``n_slots`` sequences decoded together."""

    def __init__(self, path: Path, *, n_ctx: int, n_slots: int = 1, n_gpu_layers: int = 0,
                 n_threads: int | None = None, use_extra_bufts: bool = True,
                 model_id: str = "", name: str | None = None) -> None:
        if n_slots < 1 or n_ctx < 2:
            raise ValueError("need at least one slot and a context of 2 tokens")
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.use_extra_bufts = use_extra_bufts
        try:
            self.model: Any = llama_internals.LlamaModel(path_model=str(path), params=mparams,
                                                    verbose=False)
        except ValueError as exc:
            raise EngineError(f"llama.cpp could not load {path}: {exc}") from exc
        threads = n_threads or max(1, (_cpu_count() // 2))
        cparams = llama_cpp.llama_context_default_params()
        # Each slot may use the whole per-job context; unified cells let slots share a
        # copied prefix. n_ctx is per sequence, as advertised.
        cparams.n_ctx = n_ctx * n_slots
        cparams.n_batch = N_BATCH
        cparams.n_ubatch = N_BATCH
        cparams.n_seq_max = n_slots
        cparams.kv_unified = True
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        try:
            self.ctx: Any = llama_internals.LlamaContext(model=self.model, params=cparams,
                                                    verbose=False)
        except ValueError as exc:
            raise EngineError(f"llama.cpp could not create a context: {exc}") from exc
        self.batch: Any = llama_internals.LlamaBatch(n_tokens=N_BATCH, embd=0, n_seq_max=1,
                                                verbose=False)
        self.memory = self.ctx.memory
        self.vocab = self.model.vocab
        self.n_vocab = int(self.model.n_vocab())
        self.n_ctx = n_ctx
        self.n_slots = n_slots
        self._add_bos = bool(self.model.add_bos_token())
        self._specials = SpecialTokenBudget(special_texts(self.vocab, self.n_vocab))
        self._buf = ctypes.create_string_buffer(PIECE_BUFFER_BYTES)
        self.slots = [_Slot(i) for i in range(n_slots)]
        self.decoded_total = 0
        metadata: Mapping[str, str] = self.model.metadata()
        self.info = ModelInfo(
            model_id=model_id,
            name=name or metadata.get("general.name") or path.stem,
            quant=_quant_name(metadata),
            n_ctx=n_ctx,
            path=path,
            chat_format=chat_format_of(metadata.get("tokenizer.chat_template")),
        )
        # The penalties sampler reads this (llama_cpp.Llama's default history length).
        self.last_n_tokens_size = 64

    # ---- what a request costs and whether it fits --------------------------------

    def tokenize(self, text: str) -> list[int]:
        """As llama.LlamaEngine.tokenize: special tokens parsed, after counting them."""
        self._specials.check(text)
        tokens: list[int] = self.model.tokenize(text.encode("utf-8"), self._add_bos, True)
        return tokens

    def prepare(self, prompt: str, params: SamplingParams, max_tokens: int,
                tokens: list[int] | None = None) -> list[int]:
        """The prompt's tokens once the request is known to fit (typed errors otherwise);
        `tokens`, when given, are the prompt's tokens already counted (not redone)."""
        tokenize = self.tokenize if tokens is None else (lambda _prompt: tokens)
        return checked_prompt(tokenize, self.n_vocab, self.n_ctx, prompt, params,
                              max_tokens)

    @property
    def free_slots(self) -> int:
        return sum(not s.busy for s in self.slots)

    # ---- sequences -----------------------------------------------------------------

    def admit(self, job_id: int, tokens: list[int], params: SamplingParams,
              max_tokens: int) -> Sequence | None:
        """Start a sequence in a free slot (None if all are busy), reusing the longest
        cached prefix of its prompt found in any slot."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        slot = max(free, key=lambda s: _common_prefix(s.tokens, tokens))
        # Re-evaluate at least the last prompt token so fresh logits exist to sample from.
        limit = len(tokens) - 1
        keep = min(_common_prefix(slot.tokens, tokens), limit)
        donor = max(self.slots, key=lambda s: _common_prefix(s.tokens, tokens))
        donor_keep = min(_common_prefix(donor.tokens, tokens), limit)
        if donor is not slot and donor_keep > keep:
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, 0, -1)
            llama_cpp.llama_memory_seq_cp(self.memory, donor.seq_id, slot.seq_id, 0,
                                          donor_keep)
            keep = donor_keep
        elif not llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, keep, -1):
            llama_cpp.llama_memory_seq_rm(self.memory, slot.seq_id, 0, -1)  # recurrent
            keep = 0
        slot.tokens = tokens[:keep]
        slot.busy = True
        sampler = _make_sampler(self, self.n_vocab, params)
        return Sequence(job_id, slot, tokens, keep, params, max_tokens, sampler)

    def release(self, seq: Sequence) -> None:
        """Free the sequence's slot now (its cells stay for prefix reuse)."""
        if seq.slot.busy:
            seq.slot.busy = False
            seq.sampler.close()
            seq.finished = True

    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, TokenChunk | None]]:
        """One llama_decode over ``seqs`` (those allowed to advance now). Returns the text
        each released, if any; a sequence whose ``finished`` is set is done."""
        out: list[tuple[Sequence, TokenChunk | None]] = []
        batch = self.batch.batch
        batch.n_tokens = 0
        logits_at: list[tuple[Sequence, int]] = []

        def add(seq: Sequence, tokens: list[int], want_logits: bool) -> None:
            base = batch.n_tokens
            pos = len(seq.slot.tokens)
            for i, token in enumerate(tokens):
                batch.token[base + i] = token
                batch.pos[base + i] = pos + i
                batch.seq_id[base + i][0] = seq.slot.seq_id
                batch.n_seq_id[base + i] = 1
                batch.logits[base + i] = False
            batch.n_tokens = base + len(tokens)
            seq.slot.tokens.extend(tokens)
            if want_logits:
                batch.logits[batch.n_tokens - 1] = True
                logits_at.append((seq, batch.n_tokens - 1))

        decoding = [s for s in seqs if not s.finished and not s.prefilling]
        prefilling = [s for s in seqs if not s.finished and s.prefilling]
        for seq in decoding:
            if seq.tail_pending:
                out.append((seq, self._end(seq, seq.finish_reason, seq.assembler.finish())))
            else:
                add(seq, seq.pending, True)
                seq.pending = []
        budget = N_BATCH - batch.n_tokens
        if batch.n_tokens:
            budget = min(budget, PREFILL_CHUNK_WHILE_DECODING)
        for seq in prefilling:
            if budget <= 0:
                break
            chunk = seq.pending[:budget]
            del seq.pending[: len(chunk)]
            budget -= len(chunk)
            done = not seq.pending
            add(seq, chunk, done)
            if done:
                seq.prefilling = False
        if not batch.n_tokens:
            return out
        code = llama_cpp.llama_decode(self.ctx.ctx, batch)
        if code != 0:
            raise EngineError(f"llama_decode returned {code}")
        for seq, idx in logits_at:
            out.append((seq, self._sample(seq, idx)))
        return out

    def _sample(self, seq: Sequence, idx: int) -> TokenChunk | None:
        token = int(seq.sampler.sample(self.ctx, idx))
        if llama_cpp.llama_vocab_is_eog(self.vocab, token):
            return self._end(seq, "stop", seq.assembler.finish())
        seq.completion_tokens += 1
        self.decoded_total += 1
        chunk = seq.assembler.feed(_token_piece(self.vocab, token, self._buf))
        if seq.assembler.stopped:
            return self._end(seq, "stop", chunk)
        if seq.completion_tokens >= seq.max_tokens or len(seq.slot.tokens) + 1 >= self.n_ctx:
            seq.finish_reason = "length"
            seq.tail_pending = True  # release held-back text on the next step
            return chunk
        seq.pending = [token]
        return chunk

    def _end(self, seq: Sequence, reason: FinishReason, chunk: TokenChunk | None
             ) -> TokenChunk | None:
        seq.finish_reason = reason
        self.release(seq)
        return chunk

    def steady_logit_bias(self) -> dict[int, float]:
        """llama.steady_logit_bias for this model (tests and benchmarks)."""
        return steady_bias_for(self.vocab, self.n_vocab, int(self.model.token_bos()))

    def warm_up(self) -> None:
        """Decode one token now so llama.cpp builds its compute graph before the first
        client (about 0.6 s for Gemma 3 270M on a 2-core CPU); leaves no slot busy."""
        greedy = SamplingParams(temperature=0.0)
        seq = self.admit(-1, self.prepare("Hello", greedy, 1), greedy, 1)
        assert seq is not None
        while not seq.finished:
            self.step([seq])

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.model.close()


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 1
