"""The generated tiny llama: fast, deterministic, and a real model to llama.cpp."""

from __future__ import annotations

import time
from pathlib import Path

from meshnode.engine.llama import LlamaEngine
from meshnode.engine.tinymodel import (
    BOS_ID,
    FIRST_BYTE_ID,
    SPM_SPACE,
    tiny_model_path,
    tiny_vocab,
    write_tiny_llama,
)

# Generous against a loaded 2-core CI box; the write itself takes ~30 ms.
MAX_WRITE_SECONDS = 1.0


def _piece_id(piece: str) -> int:
    return [p for p, _, _ in tiny_vocab()].index(piece)


def test_writes_in_well_under_a_second(tmp_path: Path) -> None:
    start = time.perf_counter()
    write_tiny_llama(tmp_path / "m.gguf")
    assert time.perf_counter() - start < MAX_WRITE_SECONDS


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=7)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=7)
    assert a.read_bytes() == b.read_bytes()


def test_different_seeds_give_different_weights(tmp_path: Path) -> None:
    a = write_tiny_llama(tmp_path / "a.gguf", seed=1)
    b = write_tiny_llama(tmp_path / "b.gguf", seed=2)
    assert a.read_bytes() != b.read_bytes()


def test_every_multi_char_piece_has_its_prefix_in_the_vocab() -> None:
    pieces = {p for p, _, _ in tiny_vocab()}
    words = [p for p in pieces if p.startswith(SPM_SPACE) and len(p) > 1]
    assert words
    assert all(w[:-1] in pieces for w in words)


def test_vocab_has_all_256_byte_tokens_in_order() -> None:
    pieces = [p for p, _, _ in tiny_vocab()]
    assert pieces[FIRST_BYTE_ID : FIRST_BYTE_ID + 256] == [f"<0x{b:02X}>" for b in range(256)]


async def test_llama_cpp_loads_it_with_the_written_vocab_and_context(tiny_gguf_path: Path) -> None:
    async with await LlamaEngine.load(tiny_gguf_path, n_ctx=256) as engine:
        assert engine.n_vocab == len(tiny_vocab())
        assert engine.info.n_ctx == 256
        assert engine.info.quant == "F32"


async def test_tokenizer_merges_known_words_into_single_tokens(tiny_engine: LlamaEngine) -> None:
    tokens = tiny_engine.tokenize("the river")
    assert tokens == [BOS_ID, _piece_id(SPM_SPACE + "the"), _piece_id(SPM_SPACE + "river")]


async def test_characters_outside_the_vocab_fall_back_to_byte_tokens(
    tiny_engine: LlamaEngine,
) -> None:
    emoji = "\U0001f642"
    tokens = tiny_engine.tokenize(emoji)
    expected_bytes = [FIRST_BYTE_ID + b for b in emoji.encode("utf-8")]
    assert tokens[-len(expected_bytes) :] == expected_bytes


def test_cached_path_is_written_once_and_reused(tmp_path: Path) -> None:
    first = tiny_model_path(tmp_path, seed=3)
    mtime = first.stat().st_mtime_ns
    second = tiny_model_path(tmp_path, seed=3)
    assert second == first
    assert second.stat().st_mtime_ns == mtime
    assert first.read_bytes() == write_tiny_llama(tmp_path / "fresh.gguf", seed=3).read_bytes()
    assert not list(tmp_path.glob("*.tmp"))
