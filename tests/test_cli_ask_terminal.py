"""`meshnode ask` shows an untrusted provider's text with terminal controls made inert.

The provider here is a real one (libp2p host, sealed job protocol, llama.cpp on the tiny
model) whose engine is wrapped behind the real `Engine` interface to put escape
sequences, CR, BS, BEL and NUL into its answer, as a hostile provider would. The CLI runs
as its own process, as a user runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from meshnode.engine.base import TokenChunk
from meshnode.engine.llama import LlamaEngine
from meshnode.identity import NodeIdentity
from meshnode.node import provider_node

pytestmark = pytest.mark.slow

# Sets the window title, clears the screen, returns to column 0, backspaces, rings, NUL.
HOSTILE = "\x1b]0;pwned\x07\x1b[2J\r\x08\x07\x00\x9b31m"
# One 8-token answer including the CLI's imports, on a loaded 2-core box.
ASK_TIMEOUT_S = 90.0
# From the answer's last byte to the process's exit. Closing the host's connections one
# by one took 0.8 s; flushing and exiting takes well under 0.1 s, 0.5 s leaves room for load.
EXIT_AFTER_ANSWER_S = 0.5


class _HostileGeneration:
    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._first = True

    def __aiter__(self) -> _HostileGeneration:
        return self

    def _taint(self, chunk: TokenChunk) -> TokenChunk:
        if not self._first:
            return chunk
        self._first = False
        return TokenChunk(HOSTILE + chunk.text, chunk.n_tokens)

    async def __anext__(self) -> TokenChunk:
        return self._taint(await self._inner.__anext__())

    def ready(self) -> list[TokenChunk]:
        return [self._taint(c) for c in self._inner.ready()]

    @property
    def finish_reason(self) -> Any:
        return self._inner.finish_reason

    @property
    def usage(self) -> Any:
        return self._inner.usage


class HostileEngine:
    """The real tiny engine, with control bytes put in front of its first chunk."""

    def __init__(self, engine: LlamaEngine) -> None:
        self._engine = engine
        self.info = engine.info
        self.available = True

    @asynccontextmanager
    async def stream(self, prompt: str, params: Any, max_tokens: int) -> AsyncIterator[Any]:
        async with self._engine.stream(prompt, params, max_tokens) as gen:
            yield _HostileGeneration(gen)

    async def count_tokens(self, text: str) -> int:
        return await self._engine.count_tokens(text)

    async def aclose(self) -> None:
        pass


async def ask_hostile(engine: LlamaEngine, home: Path, *extra: str) -> str:
    """`meshnode ask` against a provider whose answer carries control bytes: its stdout."""
    hostile = HostileEngine(engine)
    async with provider_node(hostile, identity=NodeIdentity.generate()) as prov:  # type: ignore[arg-type]
        env = {**os.environ, "MESHNODE_HOME": str(home), "PYTHONUNBUFFERED": "1"}
        with trio.fail_after(ASK_TIMEOUT_S):
            done = await trio.run_process(
                [sys.executable, "-m", "meshnode.cli", "ask", "--peer", prov.addrs[0],
                 "--insecure", "--max-tokens", "8", *extra, "hello"],
                capture_stdout=True, capture_stderr=True, env=env, check=False,
                stdin=b"",
            )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return done.stdout.decode("utf-8", errors="replace")


def terminal_controls(text: str) -> set[str]:
    return {c for c in text if (ord(c) < 32 and c not in "\n\t") or 0x7F <= ord(c) < 0xA0}


async def test_ask_escapes_a_providers_terminal_control_bytes(
    tiny_engine: LlamaEngine, tmp_path: Path
) -> None:
    stdout = await ask_hostile(tiny_engine, tmp_path)
    controls = terminal_controls(stdout)
    assert controls == set(), f"raw controls reached the terminal: {controls!r}"
    assert "\\x1b]0;pwned" in stdout  # shown, escaped, not dropped: the user sees the attempt


async def test_ask_json_keeps_the_providers_text_exactly_and_is_itself_inert(
    tiny_engine: LlamaEngine, tmp_path: Path
) -> None:
    stdout = await ask_hostile(tiny_engine, tmp_path, "--json")
    assert terminal_controls(stdout) == set()  # JSON escapes them: safe to print as is
    answer = json.loads(stdout)
    assert answer["text"].startswith(HOSTILE)  # a script gets the bytes the provider sent
    assert answer["completion_tokens"] == 8 and answer["insecure"] is True


async def test_ask_exits_right_after_the_last_byte_of_its_answer(
    tiny_engine: LlamaEngine, tmp_path: Path
) -> None:
    async with provider_node(tiny_engine, identity=NodeIdentity.generate()) as prov:
        env = {**os.environ, "MESHNODE_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "meshnode.cli", "ask", "--peer", prov.addrs[0],
             "--insecure", "--max-tokens", "8", "hello"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            env=env,
        )
        try:
            assert proc.stdout is not None
            last = None
            with trio.fail_after(ASK_TIMEOUT_S):
                while data := await proc.stdout.receive_some():
                    if data.strip():
                        last = trio.current_time()
                await proc.wait()
            exited = trio.current_time()
        finally:
            if proc.returncode is None:
                proc.kill()
    assert proc.returncode == 0 and last is not None
    assert exited - last < EXIT_AFTER_ANSWER_S, f"{exited - last:.2f} s after the answer"
