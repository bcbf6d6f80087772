"""Shared fixtures. Keep them generic: other layers' tests build on these."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from meshnode.engine.tinymodel import write_tiny_llama

if TYPE_CHECKING:  # llama_cpp and the TON libraries load only in tests that use them
    from pytoniq_core.boc.cell import Cell

    from meshnode.engine.llama import LlamaEngine

# Context of the shared tiny engine: room for a few hundred tokens, still instant to allocate.
TINY_TEST_CTX = 512
# Context of the long engines: a generation long enough (thousands of tokens) that it
# cannot finish by itself before a test cuts it off (a disconnect, a killed provider).
LONG_TEST_CTX = 4096


@pytest.fixture(scope="session")
def tiny_gguf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight llama GGUF (seed 0), written once per test session."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf", seed=0)


@pytest.fixture
async def tiny_engine(tiny_gguf_path: Path) -> AsyncIterator[LlamaEngine]:
    """A LlamaEngine over the tiny model, closed after the test (loading takes ~10 ms)."""
    from meshnode.engine.llama import LlamaEngine

    async with await LlamaEngine.load(tiny_gguf_path, n_ctx=TINY_TEST_CTX) as engine:
        yield engine


@pytest.fixture
async def long_engine(tiny_gguf_path: Path) -> AsyncIterator[LlamaEngine]:
    """A LlamaEngine over the tiny model with a long context (LONG_TEST_CTX)."""
    from meshnode.engine.llama import LlamaEngine

    async with await LlamaEngine.load(tiny_gguf_path, n_ctx=LONG_TEST_CTX) as engine:
        yield engine


@pytest.fixture
async def long_engines(tiny_gguf_path: Path) -> AsyncIterator[list[LlamaEngine]]:
    """Two independent long-context engines over the same tiny model: two providers."""
    from meshnode.engine.llama import LlamaEngine

    engines = [await LlamaEngine.load(tiny_gguf_path, n_ctx=LONG_TEST_CTX) for _ in range(2)]
    try:
        yield engines
    finally:
        for engine in engines:
            await engine.aclose()


@pytest.fixture(scope="session")
def code() -> Cell:
    """The payment-channel contract's code cell (the set-up step fetches it)."""
    from meshnode.pay.contract.code import ContractCodeError, load_payment_channel_code

    try:
        return load_payment_channel_code()
    except ContractCodeError as exc:
        pytest.fail(f"{exc} (run: python -m meshnode.pay.contract.code)")
