"""The demo model: real Gemma 3 270M when its package is installed, tiny otherwise."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from meshnode.engine.base import SamplingParams
from meshnode.engine.demo_model import (
    DEMO_PACKAGE,
    DEMO_PIP_NAME,
    DemoModel,
    DemoModelError,
    detect_chat_format,
    find_demo_model,
    format_prompt,
)
from meshnode.engine.llama import LlamaEngine
from meshnode.engine.tinymodel import write_tiny_llama


def _model(chat_format: str) -> DemoModel:
    return DemoModel(
        path=Path("m.gguf"),
        name="m",
        chat_format=chat_format,  # type: ignore[arg-type]
        is_real=True,
    )


def test_without_the_package_the_tiny_model_is_used_and_the_reason_says_how_to_fix_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, DEMO_PACKAGE, None)  # makes the import fail
    model = find_demo_model(tmp_path)
    assert not model.is_real
    assert DEMO_PIP_NAME in model.reason
    assert model.path.is_file()
    assert format_prompt(model, "hello there") == "hello there"


def test_gemma_turn_format_wraps_the_message_in_user_and_model_turns() -> None:
    prompt = format_prompt(_model("gemma"), "Hi")
    assert prompt == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_question_answer_format_stops_at_the_next_question() -> None:
    model = _model("qa")
    assert format_prompt(model, "Why?") == "Question: Why?\nAnswer:"
    assert model.stop == ("\nQuestion:",)


def test_a_gguf_with_a_gemma_chat_template_is_detected_as_gemma(tmp_path: Path) -> None:
    path = write_tiny_llama(
        tmp_path / "chat.gguf",
        chat_template="{{ '<start_of_turn>' + message['role'] }}",
    )
    assert detect_chat_format(path) == "gemma"


def test_a_gguf_without_a_chat_template_is_treated_as_a_base_model(tiny_gguf_path: Path) -> None:
    assert detect_chat_format(tiny_gguf_path) == "qa"


@pytest.fixture(scope="module")
def gemma(tmp_path_factory: pytest.TempPathFactory) -> DemoModel:
    package = pytest.importorskip(DEMO_PACKAGE)
    del package
    return find_demo_model(tmp_path_factory.mktemp("demo"))


@pytest.mark.slow
def test_the_packaged_model_is_joined_to_the_published_sha256(gemma: DemoModel) -> None:
    expected = sys.modules[DEMO_PACKAGE].EXPECTED_SHA256
    assert gemma.is_real
    assert hashlib.sha256(gemma.path.read_bytes()).hexdigest() == expected


@pytest.mark.slow
def test_the_joined_model_is_reused_without_rewriting(gemma: DemoModel) -> None:
    mtime = gemma.path.stat().st_mtime_ns
    calls: list[tuple[int, int]] = []
    again = find_demo_model(gemma.path.parent, lambda done, total: calls.append((done, total)))
    assert again.path == gemma.path
    assert again.path.stat().st_mtime_ns == mtime
    assert calls == []


@pytest.mark.slow
def test_the_packaged_gemma_is_the_base_model_so_it_gets_question_answer_prompts(
    gemma: DemoModel,
) -> None:
    assert gemma.chat_format == "qa"


@pytest.mark.slow
async def test_the_packaged_gemma_answers_a_question(gemma: DemoModel) -> None:
    params = SamplingParams(temperature=0.0, repeat_penalty=1.1, stop=gemma.stop)
    prompt = format_prompt(gemma, "What is the capital of France?")
    async with await LlamaEngine.load(gemma.path, n_ctx=512) as engine:
        assert engine.info.quant == "Q4_K_M"
        async with engine.stream(prompt, params, 24) as generation:
            text = "".join([chunk.text async for chunk in generation])
    assert "Paris" in text


def test_reading_metadata_from_a_file_that_is_not_gguf_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\0" * 64)
    with pytest.raises(DemoModelError, match="not a GGUF"):
        detect_chat_format(junk)
