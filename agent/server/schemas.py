"""OpenAI-compatible request bodies and response builders (pure: no I/O).

Request models validate types and ranges and name the offending parameter; unknown fields are
ignored, as OpenAI's API does, so newer clients keep working. Builders produce the exact JSON
shapes the official client parses.

Invariant: a request model's JSON schema (served in /openapi.json) accepts exactly what its
validation accepts. A rule a validator enforces is stated in the schema next to it (the
``json_schema_extra`` of the field); an integer field takes ``5`` or ``5.0`` (JSON has one number
type, and JSON Schema's ``integer`` is any number without a fraction), never ``"5"`` or ``true``.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.engine.base import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    GenerationChunk,
    SamplingParams,
    Usage,
)
from agent.errors import BadRequest


def integral(value: Any) -> Any:
    """``5.0`` is the integer 5 (as in JSON Schema); anything else goes on to strict validation.

    The ``mode="before"`` validator of every integer request field.
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _list_branch(min_items: int | None = None, max_items: int | None = None) -> Callable[[Any], None]:
    """``json_schema_extra`` that bounds the array branch of a ``str | list[...]`` field's schema."""

    def extra(schema: Any) -> None:
        for branch in schema.get("anyOf", [schema]):
            if branch.get("type") == "array":
                if min_items is not None:
                    branch["minItems"] = min_items
                if max_items is not None:
                    branch["maxItems"] = max_items

    return extra


def _token_bias(schema: Any) -> None:
    """``json_schema_extra`` of ``logit_bias``: keys are token ids, values within [-100, 100]."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "object":
            branch["propertyNames"] = {"pattern": "^[0-9]+$"}
            branch["additionalProperties"] = {"type": "number", "minimum": -100, "maximum": 100}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class _SamplingBody(BaseModel):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=1 << 20)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = Field(default=None, json_schema_extra=_list_branch(max_items=4))
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = Field(default=None, json_schema_extra=_token_bias)
    user: str | None = None

    _integers = field_validator("max_tokens", "top_k", "seed", "n", mode="before")(integral)

    def token_budget(self, default_max_tokens: int) -> int:
        """The most tokens this request may generate: the one value both the guard's role limit and
        the engine request use (:meth:`to_request`)."""
        return self.max_tokens or default_max_tokens

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit()):  # "²".isdigit() is true; int("²") fails
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values are between -100 and 100, got {bias}")
        return value

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
        )

    def stops(self) -> tuple[str, ...]:
        stops = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)


class CompletionBody(_SamplingBody):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(json_schema_extra=_list_branch(1, 1))
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_request(
        self, default_max_tokens: int, request_id: str, deadline: float | None
    ) -> CompletionRequest:
        return CompletionRequest(
            prompt=self.prompt_text,
            max_tokens=self.token_budget(default_max_tokens),
            sampling=self.sampling(),
            stop=self.stops(),
            request_id=request_id,
            deadline=deadline,
        )


def _text_part(schema: Any) -> None:
    """A content part is ``{"type": "text", "text": ...}`` (``ChatMessageBody`` refuses others)."""
    schema["properties"]["type"] = {"const": "text", "title": "Type", "type": "string"}
    schema["properties"]["text"] = {"title": "Text", "type": "string"}
    schema["required"] = ["type", "text"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_text_part)
    type: str
    text: str | None = None


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[TextPart] | None) -> str | list[TextPart] | None:
        if isinstance(value, list):
            for part in value:
                if part.type != "text" or part.text is None:
                    raise ValueError(f"only text content parts are supported, got type {part.type!r}")
        return value

    def to_message(self) -> ChatMessage:
        content = self.content
        text = (
            ""
            if content is None
            else content
            if isinstance(content, str)
            else "".join(p.text or "" for p in content)
        )
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


class ChatBody(_SamplingBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageBody] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1 << 20)

    _chat_integers = field_validator("max_completion_tokens", mode="before")(integral)  # a new name:
    # the same name would replace the inherited validator of max_tokens, top_k, seed and n

    def token_budget(self, default_max_tokens: int) -> int:
        """``max_completion_tokens`` (OpenAI's current name) wins over ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens or default_max_tokens

    def to_request(self, default_max_tokens: int, request_id: str, deadline: float | None) -> ChatRequest:
        return ChatRequest(
            messages=tuple(m.to_message() for m in self.messages),
            max_tokens=self.token_budget(default_max_tokens),
            sampling=self.sampling(),
            stop=self.stops(),
            request_id=request_id,
            deadline=deadline,
        )


MAX_EMBEDDING_INPUTS = 512


class EmbeddingBody(BaseModel):
    """``POST /v1/embeddings``. Text inputs only (token-id arrays depend on the model's tokenizer)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    input: str | list[str] = Field(json_schema_extra=_list_branch(1, MAX_EMBEDDING_INPUTS))
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    _integers = field_validator("dimensions", mode="before")(integral)

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not value:
                raise ValueError("at least one input is required")
            if len(value) > MAX_EMBEDDING_INPUTS:
                raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(value)}")
            if any(not isinstance(v, str) for v in value):
                raise ValueError("inputs must be strings (token-id arrays are not supported)")
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


GenerationBody = _SamplingBody
"""The common type of the generation bodies (:class:`CompletionBody`, :class:`ChatBody`)."""


def generation_body(path: str) -> type[_SamplingBody] | None:
    """The body model of a generation route, or None."""
    bodies: dict[str, type[_SamplingBody]] = {
        "/v1/completions": CompletionBody,
        "/v1/chat/completions": ChatBody,
    }
    return bodies.get(path)


def parse_body(model: type[BaseModel], data: Any) -> Any:
    """Validate ``data`` as ``model``; raise :class:`BadRequest` naming the first bad parameter."""
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            msg = "required parameter is missing"
        raise BadRequest(f"{param}: {msg}", param=param) from None


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def public_finish(reason: str | None) -> str | None:
    """OpenAI knows ``stop`` and ``length``; a cancelled or timed-out run reports ``length``."""
    if reason is None:
        return None
    return "stop" if reason == "stop" else "length"


def _envelope(
    cid: str,
    obj: str,
    model: str,
    created: int | None,
    choices: list[dict[str, Any]],
    usage: Usage | None = None,
) -> dict[str, Any]:
    """The fields every completion and chat object or chunk shares; ``usage`` only when given."""
    out: dict[str, Any] = {
        "id": cid,
        "object": obj,
        "created": created or int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }
    if usage is not None:
        out["usage"] = usage_json(usage)
    return out


def completion_json(
    cid: str, model: str, text: str, finish: str | None, usage: Usage, created: int | None = None
) -> dict[str, Any]:
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": public_finish(finish)}
    return _envelope(cid, "text_completion", model, created, [choice], usage)


def completion_chunk_json(cid: str, model: str, chunk: GenerationChunk, created: int) -> dict[str, Any]:
    choice = {
        "text": chunk.text,
        "index": 0,
        "logprobs": None,
        "finish_reason": public_finish(chunk.finish_reason),
    }
    return _envelope(cid, "text_completion", model, created, [choice])


def usage_chunk_json(cid: str, model: str, usage: Usage, created: int) -> dict[str, Any]:
    return _envelope(cid, "text_completion", model, created, [], usage)


def chat_json(
    cid: str, model: str, text: str, finish: str | None, usage: Usage, created: int | None = None
) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": None,
        "finish_reason": public_finish(finish),
    }
    return _envelope(cid, "chat.completion", model, created, [choice], usage)


def chat_chunk_json(
    cid: str, model: str, created: int, *, content: str | None, finish: str | None, role: bool = False
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": public_finish(finish)}
    return _envelope(cid, "chat.completion.chunk", model, created, [choice])


def chat_usage_chunk_json(cid: str, model: str, usage: Usage, created: int) -> dict[str, Any]:
    return _envelope(cid, "chat.completion.chunk", model, created, [], usage)


def embedding_json(
    model: str, vectors: list[list[float]], prompt_tokens: int, encoding: str = "float"
) -> dict[str, Any]:
    """The embeddings list; ``base64`` packs little-endian float32, as OpenAI's client expects."""

    def encode(vec: list[float]) -> list[float] | str:
        if encoding == "base64":
            return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        return vec

    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def error_json(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


__all__ = [
    "MAX_EMBEDDING_INPUTS",
    "ChatBody",
    "ChatMessageBody",
    "CompletionBody",
    "EmbeddingBody",
    "GenerationBody",
    "StreamOptions",
    "TextPart",
    "chat_chunk_json",
    "chat_json",
    "chat_usage_chunk_json",
    "embedding_json",
    "completion_chunk_json",
    "completion_json",
    "error_json",
    "generation_body",
    "integral",
    "parse_body",
    "public_finish",
    "usage_chunk_json",
    "usage_json",
]
