"""OpenAI request bodies are checked, and turned into backend requests, before any job."""

from __future__ import annotations

from typing import Any

import pytest

from meshnode.api.backend import ModelCard
from meshnode.api.errors import ApiError
from meshnode.api.openai_request import (
    DEFAULT_CHAT_MAX_TOKENS,
    DEFAULT_COMPLETION_MAX_TOKENS,
    parse_chat_request,
    parse_completion_request,
)
from meshnode.engine.base import MAX_STOP_SEQUENCES


def card(model_id: str = "a" * 64, name: str = "tiny", ctx: int = 4096,
         chat_format: str = "generic") -> ModelCard:
    return ModelCard(id=model_id, name=name, quant="F32", ctx=ctx, providers=1,
                     verified_providers=1, price_prompt_per_1k=0, price_completion_per_1k=0,
                     chat_format=chat_format)


CARDS = [card()]
USER = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": USER, **fields}


def refused(body: dict[str, Any], *, completion: bool = False) -> ApiError:
    parse = parse_completion_request if completion else parse_chat_request
    with pytest.raises(ApiError) as info:
        parse(body, CARDS)
    return info.value


def test_a_chat_request_becomes_a_rendered_prompt_for_the_model_id() -> None:
    parsed = parse_chat_request(chat(max_tokens=5), CARDS)
    assert parsed.request.model == "a" * 64
    assert parsed.request.prompt == "User: hi\n\nAssistant:"
    assert parsed.request.max_tokens == 5
    assert parsed.requested_model == "tiny"
    assert not parsed.stream and not parsed.include_usage


def test_only_sampling_parameters_the_client_set_are_sent() -> None:
    parsed = parse_completion_request({"model": "tiny", "prompt": "x"}, CARDS)
    assert parsed.request.params == {}
    parsed = parse_completion_request(
        {"model": "tiny", "prompt": "x", "temperature": 0, "top_k": 5, "seed": 3}, CARDS
    )
    assert parsed.request.params == {"temperature": 0, "top_k": 5, "seed": 3}


def test_logit_bias_keys_become_token_ids() -> None:
    parsed = parse_chat_request(chat(logit_bias={"17": -100, "3": 5}), CARDS)
    assert parsed.request.params["logit_bias"] == {17: -100, 3: 5}


def test_default_max_tokens_follow_openai_and_are_capped_by_the_context() -> None:
    assert parse_completion_request({"model": "tiny", "prompt": "x"}, CARDS).request.max_tokens \
        == DEFAULT_COMPLETION_MAX_TOKENS
    assert parse_chat_request(chat(), CARDS).request.max_tokens == DEFAULT_CHAT_MAX_TOKENS
    small = [card(ctx=100)]
    assert parse_chat_request(chat(), small).request.max_tokens == 100


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    parsed = parse_chat_request(chat(max_tokens=50, max_completion_tokens=7), CARDS)
    assert parsed.request.max_tokens == 7


def test_a_stop_string_joins_the_chat_formats_own_stops() -> None:
    stop = parse_chat_request(chat(stop="END"), CARDS).request.params["stop"]
    assert stop[0] == "END" and "\nUser:" in stop
    four = ["a", "b", "c", "d"]
    assert parse_chat_request(chat(stop=four), CARDS).request.params["stop"] == four
    assert len(four) == MAX_STOP_SEQUENCES  # the client's stops are never pushed out


def test_a_model_may_be_named_by_id_or_unique_name() -> None:
    assert parse_chat_request(chat(model="a" * 64), CARDS).card == CARDS[0]
    twins = [card("a" * 64, "same"), card("b" * 64, "same")]
    with pytest.raises(ApiError) as info:
        parse_chat_request(chat(model="same"), twins)
    error = info.value
    assert error.status == 400 and error.code == "model_ambiguous"
    assert "a" * 64 in error.message and "b" * 64 in error.message


def test_stream_options_include_usage_is_read() -> None:
    parsed = parse_chat_request(chat(stream=True, stream_options={"include_usage": True}), CARDS)
    assert parsed.stream and parsed.include_usage


def test_a_single_prompt_in_a_list_is_accepted() -> None:
    parsed = parse_completion_request({"model": "tiny", "prompt": ["once"]}, CARDS)
    assert parsed.request.prompt == "once"


def test_unknown_model_is_404() -> None:
    error = refused(chat(model="nope"))
    assert (error.status, error.code, error.param) == (404, "model_not_found", "model")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),  # beyond the model's 4096-token context
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_completion_tokens": True}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": -1}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"wat": 1}, "wat"),
        ({"model": 7}, "model"),
    ],
)
def test_bad_chat_fields_are_a_400_naming_the_parameter(
    fields: dict[str, Any], param: str
) -> None:
    error = refused(chat(**fields))
    assert error.status == 400
    assert error.param == param
    assert error.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"messages": USER}, "messages"),
    ],
)
def test_bad_completion_fields_are_a_400_naming_the_parameter(
    fields: dict[str, Any], param: str
) -> None:
    body = {"model": "tiny", "prompt": "x", **fields}
    error = refused(body, completion=True)
    assert (error.status, error.param) == (400, param)


def test_neutral_values_of_unsupported_features_are_accepted() -> None:
    parsed = parse_chat_request(
        chat(n=1, tools=[], tool_choice="none", logprobs=False, frequency_penalty=0,
             presence_penalty=0.0, response_format={"type": "text"}, user="me"),
        CARDS,
    )
    assert parsed.request.params == {"stop": ["\nUser:", "\nSystem:"]}


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(ApiError) as info:
        parse_chat_request(["model"], CARDS)
    assert info.value.status == 400
