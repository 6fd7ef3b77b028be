"""Request validation of ``doge serve``: what OpenAI defines and doge honours, and what it refuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from doge_cli.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest

USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def test_openai_fields_are_read():
    request = chat(max_tokens=5, temperature=0, top_p=0.5, stop="END", seed=3, stream=True,
                   stream_options={"include_usage": True}, user="someone")
    assert (request.max_tokens, request.temperature, request.top_p, request.seed) == (5, 0, 0.5, 3)
    assert request.stop == ["END"] and request.stream_options.include_usage


def test_content_parts_and_developer_role():
    request = chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]}])
    assert request.messages[0].text() == "ab"


def test_max_completion_tokens_is_max_tokens():
    assert chat(max_completion_tokens=7).max_tokens == 7
    with pytest.raises(ValidationError, match="disagree"):
        chat(max_tokens=3, max_completion_tokens=7)


@pytest.mark.parametrize("fields, match", [
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text"),
    ({"max_tokens": 0}, "at least 1"),
    ({"max_completion_tokens": -1}, "at least 1"),
    ({"temperature": -0.1}, "between 0 and 2"),
    ({"temperature": float("nan")}, "between 0 and 2"),
    ({"top_p": 1.5}, "between 0 and 1"),
    ({"seed": 2**64}, "seed must be an integer from"),  # once a 500, and every running stream failed with it
    ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "name is not supported"),  # once dropped
    ({"seed": -(2**63) - 1}, "seed must be an integer from"),
    ({"n": 3}, "n must be 1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"stop": [""]}, "must not be empty"),
    ({"presence_penalty": 0.5}, "not supported"),
    ({"logit_bias": {"1": 5}}, "not supported"),
    ({"logprobs": True}, "not supported"),
    ({"tools": [{"type": "function"}]}, "not supported"),
    ({"response_format": {"type": "json_object"}}, "not supported"),
    ({"stream_options": {"include_usage": True}}, "only allowed when stream"),
    ({"best_of": 2}, "Extra inputs"),  # a completions-only field
])
def test_chat_refusals(fields, match):
    with pytest.raises(ValidationError, match=match):
        chat(**fields)


def test_neutral_values_of_unsupported_fields_pass():
    chat(n=1, frequency_penalty=0, presence_penalty=0.0, logprobs=False, tool_choice="none",
         response_format={"type": "text"}, tools=[])


def test_completion_prompt_is_one_string():
    assert CompletionRequest(model="m", prompt=["only one"]).prompt == "only one"
    for prompt, match in ((["a", "b"], "one string"), ("", "not be empty"), ([1, 2, 3], "string")):
        with pytest.raises(ValidationError, match=match):
            CompletionRequest(model="m", prompt=prompt)
    for fields in ({"echo": True}, {"suffix": "x"}, {"logprobs": 2}, {"best_of": 3}):
        with pytest.raises(ValidationError, match="not supported"):
            CompletionRequest(model="m", prompt="p", **fields)


def test_api_error_body_is_openais_shape():
    err = APIError(404, "no such model", param="model", code="model_not_found")
    assert err.body() == {"error": {"message": "no such model", "type": "invalid_request_error", "param": "model",
                                    "code": "model_not_found"}}
