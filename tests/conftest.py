"""Shared fixtures. Keep them generic: other layers' tests build on these."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from meshnode.engine.tinymodel import write_tiny_llama

if TYPE_CHECKING:  # llama_cpp is imported only by tests that use the engine
    from meshnode.engine.llama import LlamaEngine

# Context of the shared tiny engine: room for a few hundred tokens, still instant to allocate.
TINY_TEST_CTX = 512


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
