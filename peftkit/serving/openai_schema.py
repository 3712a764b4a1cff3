"""OpenAI request bodies (pydantic) and the response and chunk dicts the official clients expect.

Requests carry OpenAI's field names and ranges; a field we cannot honour (n > 1, logprobs, tools,
penalties) is refused with a 400 naming it, rather than silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from peftkit.serving.requests import SEED_MAX, SEED_MIN, GenerationRequest
from peftkit.serving.errors import InvalidRequestError

MAX_STOPS = 4


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=256)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def _common(self) -> dict[str, Any]:
        if (self.n or 1) != 1:
            raise InvalidRequestError("n must be 1: this server returns one choice per request", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise InvalidRequestError(f"{name} is not supported; leave it unset or 0", param=name)
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported", param="logit_bias")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise InvalidRequestError(f"stop takes at most {MAX_STOPS} sequences, got {len(stops)}", param="stop")
        return dict(model=self.model, temperature=1.0 if self.temperature is None else self.temperature,
                    top_p=1.0 if self.top_p is None else self.top_p, stop=stops, seed=self.seed)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def to_engine(self) -> GenerationRequest:
        """Return the engine request; InvalidRequestError for options this server does not honour."""
        if self.logprobs:
            raise InvalidRequestError("logprobs is not supported", param="logprobs")
        if self.tools:
            raise InvalidRequestError("tools are not supported by this server", param="tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidRequestError("only response_format {type: text} is supported", param="response_format")
        messages = [{"role": m.role, "content": _text(m.content, i)} for i, m in enumerate(self.messages)]
        return GenerationRequest(messages=messages, max_tokens=self.max_completion_tokens or self.max_tokens, **self._common())


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    """OpenAI's default for completions is 16 tokens."""
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def to_engine(self) -> GenerationRequest:
        """Return the engine request; InvalidRequestError for options this server does not honour."""
        for name in ("echo", "suffix", "logprobs"):
            if getattr(self, name):
                raise InvalidRequestError(f"{name} is not supported", param=name)
        if (self.best_of or 1) != 1:
            raise InvalidRequestError("best_of must be 1", param="best_of")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise InvalidRequestError("send one prompt per request (a list of prompts is not supported)", param="prompt")
            prompt = prompt[0]
        return GenerationRequest(prompt=prompt, max_tokens=self.max_tokens, **self._common())


def _text(content: str | list[ContentPart] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type != "text":
            raise InvalidRequestError(f"messages[{index}].content: only text parts are supported, got {part.type!r}",
                                      param=f"messages[{index}].content")
        if part.text is None:
            raise InvalidRequestError(f"messages[{index}].content: a text part needs its 'text'", param=f"messages[{index}].content")
        parts.append(part.text)
    return "".join(parts)


# ---------------------------------------------------------------- responses

def new_id(kind: Literal["chat", "text"]) -> str:
    """Return a fresh completion id (chatcmpl-... or cmpl-...)."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """Return OpenAI's usage object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(kind: str, rid: str, model: str, text: str, finish: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    """Return a whole (non-streamed) chat.completion or text_completion response."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chunk_body(kind: str, rid: str, model: str, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
    """Return one streamed chunk (chat.completion.chunk or text_completion)."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def usage_chunk(kind: str, rid: str, model: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """Return the last chunk of a stream with stream_options.include_usage: no choices, only usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """Return OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
