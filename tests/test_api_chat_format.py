"""Chat messages become the prompt each model family was trained on."""

from __future__ import annotations

import pytest

from meshnode.api.chat_format import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    ChatMessage,
    chat_format,
    guess_chat_format,
    parse_messages,
    render_chat,
)
from meshnode.api.errors import ApiError


def test_gemma_turns_fold_the_system_prompt_into_the_first_user_turn() -> None:
    prompt, stop = render_chat(
        [
            ChatMessage("system", "Be brief."),
            ChatMessage("user", "Hi"),
            ChatMessage("assistant", "Hello!"),
            ChatMessage("user", "Bye"),
        ],
        "gemma",
    )
    assert prompt == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert stop == ()  # Gemma ends its turn with a real end-of-generation token


def test_generic_format_is_a_role_prefixed_transcript_stopped_by_the_next_speaker() -> None:
    prompt, stop = render_chat(
        [ChatMessage("developer", "Be brief."), ChatMessage("user", "Hi")], "generic"
    )
    assert prompt == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    assert "\nUser:" in stop


def test_chatml_and_llama3_open_an_assistant_turn() -> None:
    chatml, _ = render_chat([ChatMessage("user", "Hi")], "chatml")
    assert chatml == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    llama3, _ = render_chat([ChatMessage("user", "Hi")], "llama3")
    assert llama3.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "<|begin_of_text|>" not in llama3  # the tokenizer adds BOS itself


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gemma-3-270m-it", "gemma"),
        ("Qwen2.5-0.5B-Instruct", "chatml"),
        ("Meta-Llama-3.1-8B-Instruct", "llama3"),
        ("tiny-llama-random", "generic"),
    ],
)
def test_the_format_is_guessed_from_the_model_family(name: str, expected: str) -> None:
    assert guess_chat_format(name) == expected


def test_unknown_format_name_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="gemma"):
        chat_format("vicuna")


def test_text_parts_are_joined_into_one_content() -> None:
    messages = parse_messages(
        [{"role": "user", "content": [{"type": "text", "text": "a"},
                                      {"type": "text", "text": "b"}]}]
    )
    assert messages == [ChatMessage("user", "ab")]


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "tool", "content": "x"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": 7}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
         "messages[0].content[0]"),
        ([{"role": "user", "content": "x"}, "not an object"], "messages[1]"),
        ([{"role": {}, "content": "x"}], "messages[0].role"),  # unhashable: was a 500
        ([{"role": ["user"], "content": "x"}], "messages[0].role"),
        ([{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}],
         "messages[0].tool_calls"),
    ],
)
def test_bad_messages_are_a_400_naming_the_field(messages: object, param: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_messages(messages)
    assert info.value.status == 400
    assert info.value.param == param


def test_message_count_and_parts_are_bounded() -> None:
    with pytest.raises(ApiError, match=str(MAX_MESSAGES)):
        parse_messages([{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1))
    parts = [{"type": "text", "text": "x"}] * (MAX_CONTENT_PARTS + 1)
    with pytest.raises(ApiError, match=str(MAX_CONTENT_PARTS)):
        parse_messages([{"role": "user", "content": parts}])
