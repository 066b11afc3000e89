"""OpenAI-compatible request bodies and response builders (pure: no I/O).

Request models validate types and ranges and name the offending parameter; unknown fields are
ignored, as OpenAI's API does, so newer clients keep working. Builders produce the exact JSON
shapes the official client parses.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.engine.base import CompletionRequest, GenerationChunk, SamplingParams, Usage
from agent.errors import BadRequest


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class CompletionBody(BaseModel):
    """``POST /v1/completions``."""

    model_config = ConfigDict(extra="ignore", strict=False)

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=1 << 20)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    echo: bool = False
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("exactly one prompt per request is supported")
        return value

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
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values are between -100 and 100, got {bias}")
        return value

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_request(
        self, default_max_tokens: int, request_id: str, deadline: float | None
    ) -> CompletionRequest:
        stops: tuple[str, ...] = (
            () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        )
        return CompletionRequest(
            prompt=self.prompt_text,
            max_tokens=self.max_tokens or default_max_tokens,
            sampling=SamplingParams(
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                repeat_penalty=self.repeat_penalty,
                frequency_penalty=self.frequency_penalty,
                presence_penalty=self.presence_penalty,
                seed=self.seed,
                logit_bias={int(k): v for k, v in (self.logit_bias or {}).items()},
            ),
            stop=tuple(s for s in stops if s),
            request_id=request_id,
            deadline=deadline,
        )


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


def completion_json(
    cid: str, model: str, text: str, finish: str | None, usage: Usage, created: int | None = None
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created or int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": public_finish(finish)}],
        "usage": usage_json(usage),
    }


def completion_chunk_json(cid: str, model: str, chunk: GenerationChunk, created: int) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "text": chunk.text,
                "index": 0,
                "logprobs": None,
                "finish_reason": public_finish(chunk.finish_reason),
            }
        ],
    }


def usage_chunk_json(cid: str, model: str, usage: Usage, created: int) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_json(usage),
    }


def error_json(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


__all__ = [
    "CompletionBody",
    "StreamOptions",
    "completion_chunk_json",
    "completion_json",
    "error_json",
    "parse_body",
    "public_finish",
    "usage_chunk_json",
    "usage_json",
]
