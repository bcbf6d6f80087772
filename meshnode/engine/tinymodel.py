"""A tiny random-weight llama GGUF, written on demand for tests and offline demos.

The weights are noise, so the text is gibberish, but everything around it is real:
llama.cpp loads the file, tokenizes with a SentencePiece-style vocab (byte fallback,
BOS/EOS/UNK), decodes on CPU in well under a millisecond per token, and the same seed
gives the same file byte for byte (so the same model id).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType

# Bump when the generated file changes for a given seed, so cached copies are not reused.
TINY_FORMAT_VERSION = 1

# SentencePiece's word-boundary marker; llama.cpp maps it to a space when detokenizing.
SPM_SPACE = "\u2581"

UNK_ID = 0
BOS_ID = 1
EOS_ID = 2
FIRST_BYTE_ID = 3  # <0x00>..<0xFF> follow the three control tokens

# Common English words: each becomes a "▁word" piece, together with every prefix so that
# SentencePiece's pairwise merges can actually reach it.
_WORDS = (
    "the of and to in is was he for it with as his on be at by had are but from or have an "
    "they which one you were her all she there would their we him been has when who will "
    "more no if out so said what up its about into than them can only other new some could "
    "time these two may then do first any my now such like our over man me even most made "
    "after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still "
    "own see men work long get here between both life being under never day same another "
    "know while last might us great old year off come since against go came right used take "
    "three mesh node token model peer price proof trust local light fast small every quiet "
    "river stone cloud green blue red tree bird sun moon star night morning water fire "
    "earth wind road house city music story paper friend hello answer question think"
).split()

# A few non-ASCII letters as whole pieces, so multi-byte UTF-8 shows up without fallback.
_EXTRA_CHARS = ("é", "ü", "ß", "ñ", "ø", "—", "€", "中", "文")


@dataclass(frozen=True)
class TinyDims:
    """Shape of the generated network; small enough that CPU decode is effectively free."""

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2  # fewer KV heads than query heads, as in modern llamas (GQA)
    n_ff: int = 160
    n_ctx: int = 512


def tiny_vocab() -> list[tuple[str, float, TokenType]]:
    """The (piece, score, type) list, in token-id order."""
    vocab: list[tuple[str, float, TokenType]] = [
        ("<unk>", 0.0, TokenType.UNKNOWN),
        ("<s>", 0.0, TokenType.CONTROL),
        ("</s>", 0.0, TokenType.CONTROL),
    ]
    vocab.extend((f"<0x{b:02X}>", 0.0, TokenType.BYTE) for b in range(256))
    pieces: list[str] = [SPM_SPACE]
    pieces.extend(chr(c) for c in range(0x21, 0x7F))
    pieces.extend(_EXTRA_CHARS)
    for word in _WORDS:
        full = SPM_SPACE + word
        pieces.extend(full[:end] for end in range(2, len(full) + 1))
    seen: set[str] = set()
    normal: list[str] = []
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            normal.append(piece)
    # Scores order the merges; any strict order works because every prefix is present.
    vocab.extend((piece, -float(i), TokenType.NORMAL) for i, piece in enumerate(normal))
    return vocab


def write_tiny_llama(
    path: Path,
    *,
    seed: int = 0,
    dims: TinyDims = TinyDims(),
    name: str = "tiny-llama-random",
    chat_template: str | None = None,
) -> Path:
    """Write a random-weight llama-architecture GGUF to ``path`` and return ``path``.

    The output is a pure function of the arguments and TINY_FORMAT_VERSION.
    """
    if dims.n_embd % dims.n_head or dims.n_head % dims.n_head_kv:
        raise ValueError("n_embd must be divisible by n_head, and n_head by n_head_kv")
    rng = np.random.default_rng(seed)
    vocab = tiny_vocab()
    n_vocab = len(vocab)
    head_dim = dims.n_embd // dims.n_head
    n_embd_kv = head_dim * dims.n_head_kv

    writer = GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(dims.n_ctx)
    writer.add_embedding_length(dims.n_embd)
    writer.add_block_count(dims.n_layer)
    writer.add_feed_forward_length(dims.n_ff)
    writer.add_head_count(dims.n_head)
    writer.add_head_count_kv(dims.n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)

    writer.add_tokenizer_model("llama")
    writer.add_token_list([piece for piece, _, _ in vocab])
    writer.add_token_scores([score for _, score, _ in vocab])
    writer.add_token_types([int(kind) for _, _, kind in vocab])
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    def matrix(rows: int, cols: int, std: float) -> np.ndarray:
        # numpy shape is (rows, cols) = ggml ne[1], ne[0]: "rows" is the output dimension.
        return (rng.standard_normal((rows, cols)) * std).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    f32 = GGMLQuantizationType.F32
    inv = 1.0 / float(np.sqrt(dims.n_embd))
    writer.add_tensor("token_embd.weight", matrix(n_vocab, dims.n_embd, 1.0), raw_dtype=f32)
    for i in range(dims.n_layer):
        blk = f"blk.{i}"
        writer.add_tensor(f"{blk}.attn_norm.weight", ones(dims.n_embd), raw_dtype=f32)
        writer.add_tensor(f"{blk}.attn_q.weight", matrix(dims.n_embd, dims.n_embd, inv))
        writer.add_tensor(f"{blk}.attn_k.weight", matrix(n_embd_kv, dims.n_embd, inv))
        writer.add_tensor(f"{blk}.attn_v.weight", matrix(n_embd_kv, dims.n_embd, inv))
        writer.add_tensor(f"{blk}.attn_output.weight", matrix(dims.n_embd, dims.n_embd, inv))
        writer.add_tensor(f"{blk}.ffn_norm.weight", ones(dims.n_embd), raw_dtype=f32)
        writer.add_tensor(f"{blk}.ffn_gate.weight", matrix(dims.n_ff, dims.n_embd, inv))
        writer.add_tensor(f"{blk}.ffn_up.weight", matrix(dims.n_ff, dims.n_embd, inv))
        writer.add_tensor(f"{blk}.ffn_down.weight", matrix(dims.n_embd, dims.n_ff, inv))
    writer.add_tensor("output_norm.weight", ones(dims.n_embd), raw_dtype=f32)
    # A larger output scale gives peaked next-token distributions, so sampling at
    # moderate temperatures still differs visibly between seeds.
    writer.add_tensor("output.weight", matrix(n_vocab, dims.n_embd, 0.5))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_model_path(cache_dir: Path, *, seed: int = 0) -> Path:
    """Return the cached tiny model under ``cache_dir``, writing it first if missing.

    Written to a temporary name and renamed, so a crash never leaves a torn file that a
    later run would load.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"tiny-llama-seed{seed}-v{TINY_FORMAT_VERSION}.gguf"
    if target.exists():
        return target
    fd, tmp_name = tempfile.mkstemp(prefix=".tiny-", suffix=".gguf.tmp", dir=cache_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_tiny_llama(tmp, seed=seed)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
