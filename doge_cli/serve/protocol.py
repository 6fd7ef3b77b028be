"""The request bodies ``doge serve`` accepts and the error shape it answers with, after OpenAI's API.

Requests are validated by pydantic. A field OpenAI defines that doge honours is declared with its
meaning; one that doge does not implement is declared too but accepted only at its neutral value
(``n=1``, no penalties, no tools, no logprobs, ...), so a client never gets a reply that silently
ignored what it asked for. Unknown fields are refused, as OpenAI refuses them.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

ROLES = ("system", "developer", "user", "assistant")
"""Roles a chat message may have; ``developer`` (OpenAI's newer name for system) is rendered as system."""
MAX_STOP = 4  # stop strings per request, OpenAI's limit


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; a message's role is one of {', '.join(ROLES)}")
        return role

    @field_validator("name")
    @classmethod
    def _no_name(cls, name: str | None) -> str | None:
        # Doge's chat template has no place for a speaker's name: refused rather than silently dropped.
        if name is not None:
            raise ValueError("a message's name is not supported by doge serve (the chat template has no place for "
                             "it); leave it out")
        return name

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Generation(_Strict):
    """What both endpoints share: the model, sampling, stopping and streaming."""

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for the caller's own bookkeeping; doge does not use it
    # Accepted only at their neutral values (doge does not implement them):
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("max_tokens must be at least 1")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and 0 <= value <= 2):
            raise ValueError("temperature must be between 0 and 2 (0: always the likeliest token)")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None) -> int | None:
        from doge_cli.inference.sampling import SEED_RANGE

        if value is not None and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise ValueError(f"seed must be an integer from {SEED_RANGE[0]} to {SEED_RANGE[1]}")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
            raise ValueError("top_p must be between 0 and 1")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [] if value is None else [value] if isinstance(value, str) else list(value)
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(not s for s in stops):
            raise ValueError("a stop sequence must not be empty")
        return stops

    @model_validator(mode="after")
    def _neutral(self):
        if self.n != 1:
            raise ValueError("n must be 1: doge serve returns one choice per request")
        if self.frequency_penalty or self.presence_penalty:
            raise ValueError("frequency_penalty and presence_penalty are not supported by doge serve; leave them 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by doge serve")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @field_validator("messages")
    @classmethod
    def _some(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("messages must hold at least one message")
        return messages

    @field_validator("max_completion_tokens")
    @classmethod
    def _positive_completion(cls, value: int | None) -> int | None:
        return cls._positive(value)

    @model_validator(mode="after")
    def _chat_neutral(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; set one of them")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs are not supported by doge serve")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format other than text is not supported by doge serve")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools are not supported by doge serve")
        return self


class CompletionRequest(_Generation):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ValueError("prompt must be one string: doge serve completes one prompt per request")
            prompt = prompt[0]
        if not prompt:
            raise ValueError("prompt must not be empty")
        return prompt

    @model_validator(mode="after")
    def _completion_neutral(self):
        if self.echo or self.suffix or self.logprobs or self.best_of not in (None, 1):
            raise ValueError("echo, suffix, logprobs and best_of are not supported by doge serve")
        return self
