"""OpenAI-compatible request bodies and response builders (pure: no I/O).

Request models validate types and ranges and name the offending parameter. Nothing is silently
ignored: a field we do not implement (OpenAI's ``audio``, a typo, a newer field) is a ``400`` with
code ``unsupported_parameter`` naming it; fields that are only metadata to us (``user``, ``store``,
``metadata``, ...) are accepted and documented as such (docs/api.md, "Request fields"). Builders
produce the exact JSON shapes the official client parses.

Invariant: a request model's JSON schema (served in /openapi.json) accepts exactly what its
validation accepts. A rule a validator enforces is stated in the schema next to it (the
``json_schema_extra`` of the field); an integer field takes ``5`` or ``5.0`` (JSON has one number
type, and JSON Schema's ``integer`` is any number without a fraction), never ``"5"`` or ``true``.
"""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.engine.base import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    GenerationChunk,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from agent.engine.grammar import check_gbnf, json_object_grammar, schema_grammar
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


_STRICT = ConfigDict(extra="forbid", strict=True)
"""Every request model: unknown fields refused (``unsupported_parameter``), types strict."""


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False
    include_obfuscation: Literal[False] = False
    """OpenAI pads stream chunks with an ``obfuscation`` field; we do not: only ``false`` is taken."""


class JsonSchemaSpec(BaseModel):
    """``response_format.json_schema``: the schema the answer must validate against."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    """JSON Schema (docs/api.md, "Structured output", lists the keywords enforced); absent: any JSON."""
    strict: bool | None = None
    """Accepted either way: the schema is always enforced (by grammar)."""


class TextFormat(BaseModel):
    model_config = _STRICT
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    model_config = _STRICT
    type: Literal["json_object"]


class JsonSchemaFormat(BaseModel):
    model_config = _STRICT
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class _SamplingBody(BaseModel):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    model_config = _STRICT

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
    """Metadata: recorded in the request log line, nothing else."""

    response_format: ResponseFormat | None = None
    """``json_object`` or ``json_schema``: the answer is constrained by a grammar to parse (and
    validate); ``text``: no constraint."""
    grammar: str | None = Field(default=None, min_length=1, max_length=65536)
    """A GBNF grammar (llama.cpp's server's extension); not with a JSON ``response_format``."""

    _integers = field_validator("max_tokens", "top_k", "seed", "n", mode="before")(integral)

    def grammar_text(self) -> str | None:
        """The GBNF the generation follows, or None; :class:`BadRequest` names an unsupported
        schema keyword (``response_format``) or a conflict with ``grammar``."""
        fmt = self.response_format
        if fmt is None or isinstance(fmt, TextFormat):
            return None if self.grammar is None else check_gbnf(self.grammar)
        if self.grammar is not None:
            raise BadRequest("grammar: give a grammar or a JSON response_format, not both", param="grammar")
        if isinstance(fmt, JsonObjectFormat):
            return json_object_grammar()
        schema: Any = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else True
        return schema_grammar(schema, "response_format.json_schema.schema")

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
            grammar=self.grammar_text(),
            logprobs=self.logprob_count(),
        )

    def logprob_count(self) -> int | None:
        """Alternatives per token to report, or None for no log probabilities."""
        return None

    def stops(self) -> tuple[str, ...]:
        stops = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)


class CompletionBody(_SamplingBody):
    """``POST /v1/completions``."""

    prompt: str | list[str] = Field(json_schema_extra=_list_branch(1, 1))
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    """Log probabilities of the sampled tokens and this many alternatives (OpenAI's legacy shape)."""

    _logprob_integers = field_validator("logprobs", mode="before")(integral)

    def logprob_count(self) -> int | None:
        if self.logprobs is not None and self.echo:
            raise BadRequest(
                "logprobs: not with echo (the prompt's log probabilities are not computed)", param="logprobs"
            )
        return self.logprobs

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
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_text_part)
    type: str
    text: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_type(cls, data: Any) -> Any:
        """An image or audio part is refused as such, before its fields are looked at."""
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"only text content parts are supported, got type {data.get('type')!r}")
        return data


def _text_only(value: str | list[TextPart] | None) -> str | list[TextPart] | None:
    if isinstance(value, list):
        for part in value:
            if part.type != "text" or part.text is None:
                raise ValueError(f"only text content parts are supported, got type {part.type!r}")
    return value


def content_text(content: str | list[TextPart] | None) -> str:
    """A message's content as one string (text parts joined; none: empty)."""
    if content is None:
        return ""
    return content if isinstance(content, str) else "".join(p.text or "" for p in content)


class _Message(BaseModel):
    model_config = _STRICT
    content: str | list[TextPart]

    _text = field_validator("content")(_text_only)

    @property
    def text(self) -> str:
        return content_text(self.content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    """``developer`` is OpenAI's newer name for ``system``."""


class UserMessage(_Message):
    role: Literal["user"]


class FunctionCall(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    arguments: str
    """JSON text, as the answer gave it."""


class ToolCall(BaseModel):
    model_config = _STRICT
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(BaseModel):
    model_config = _STRICT
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)
    refusal: None = None
    """What a client echoes back from our own answer (``message.model_dump()``): always null."""
    audio: None = None
    function_call: None = None
    annotations: None = None

    _text = field_validator("content")(_text_only)

    @property
    def text(self) -> str:
        return content_text(self.content)


class ToolMessage(_Message):
    role: Literal["tool"]
    tool_call_id: str = Field(min_length=1, max_length=256)
    """The ``id`` of the call (in an earlier assistant message) this is the result of."""


ChatMessageBody = Annotated[
    SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")
]
"""One message of ``messages``, by ``role``."""


class FunctionDef(BaseModel):
    model_config = _STRICT
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON Schema of an object (docs/api.md, "Structured output", lists what is enforced);
    absent: no parameters."""
    strict: bool | None = None
    """Accepted either way: the arguments of a call always validate."""


class ToolDef(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = _STRICT
    name: str


class NamedToolChoice(BaseModel):
    model_config = _STRICT
    type: Literal["function"]
    function: NamedFunction


class ChatBody(_SamplingBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessageBody] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    tools: list[ToolDef] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """Default: ``auto`` with tools, ``none`` without."""
    parallel_tool_calls: bool | None = None
    """Default true: an answer may call several functions."""
    logprobs: bool | None = None
    """Log probabilities of the answer's tokens (``choices[0].logprobs.content``)."""
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    """With ``logprobs``: this many most likely alternatives per token."""

    _logprob_integers = field_validator("top_logprobs", mode="before")(integral)

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs: only with logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    store: bool | None = None
    """Metadata: nothing is stored either way (OpenAI keeps completions for its dashboard)."""
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    """Metadata: at most 16 string pairs, as OpenAI takes; not used."""
    safety_identifier: str | None = None
    """Metadata, like ``user``."""
    prompt_cache_key: str | None = None
    """Metadata: prefix reuse is automatic here (docs/engine.md, "Prefix reuse")."""
    service_tier: Literal["auto", "default"] | None = None
    """There is one tier; ``flex``, ``priority`` ... are refused."""
    modalities: list[Literal["text"]] | None = Field(default=None, min_length=1, max_length=1)
    """Text only: ``["text"]``."""

    _chat_integers = field_validator("max_completion_tokens", mode="before")(integral)  # a new name:
    # the same name would replace the inherited validator of max_tokens, top_k, seed and n

    def token_budget(self, default_max_tokens: int) -> int:
        """``max_completion_tokens`` (OpenAI's current name) wins over ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens or default_max_tokens

    def to_request(self, default_max_tokens: int, request_id: str, deadline: float | None) -> ChatRequest:
        """The engine request; ``tool_choice``, ``tools`` and tool messages are planned apart
        (:mod:`agent.server.tools` rewrites the messages and the grammar)."""
        return ChatRequest(
            messages=tuple(
                ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text)
                for m in self.messages
            ),
            max_tokens=self.token_budget(default_max_tokens),
            sampling=self.sampling(),
            stop=self.stops(),
            request_id=request_id,
            deadline=deadline,
        )


class TokenizeBody(BaseModel):
    """``POST /tokenize``: llama.cpp's server's shape (``model`` added: which vocabulary)."""

    model_config = _STRICT
    model: str | None = None
    content: str
    add_special: bool = False
    """Add the model's beginning-of-sequence token, as a prompt gets it."""
    with_pieces: bool = False
    """``[{"id", "piece"}]`` instead of ids (a piece that is not whole UTF-8 is given as its bytes)."""


class DetokenizeBody(BaseModel):
    """``POST /detokenize``: llama.cpp's server's shape (``model`` added)."""

    model_config = _STRICT
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0, le=(1 << 31) - 1)]] = Field(max_length=1 << 17)

    @field_validator("tokens", mode="before")
    @classmethod
    def _token_ids(cls, value: Any) -> Any:
        return [integral(t) for t in value] if isinstance(value, list) else value


MAX_EMBEDDING_INPUTS = 512


class EmbeddingBody(BaseModel):
    """``POST /v1/embeddings``. Text inputs only (token-id arrays depend on the model's tokenizer)."""

    model_config = _STRICT

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


_TAGS = frozenset({"system", "developer", "user", "assistant", "tool", "text", "json_object", "json_schema"})


def _untagged(loc: tuple[int | str, ...]) -> list[int | str]:
    """A validation error's location without the tags pydantic adds for a discriminated union
    (``messages.0.user.name`` is ``messages.0.name``)."""
    out: list[int | str] = []
    for i, part in enumerate(loc):
        holder = loc[i - 1] if i else None
        if part in _TAGS and (isinstance(holder, int) or holder == "response_format"):
            continue
        if part in ("str", "list[TextPart]"):  # a message's content: the part is named in the message
            break
        out.append(part)
    return out


UNSUPPORTED = "unsupported_parameter"
"""The error code of a field edge-agent does not implement."""
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
    """Validate ``data`` as ``model``; raise :class:`BadRequest` naming the first bad parameter.

    A field the model does not declare is reported first, with code ``unsupported_parameter``
    (it is the likelier mistake: a feature the client expects and we lack).
    """
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        extra = [e for e in errors if e["type"] == "extra_forbidden"]
        first = extra[0] if extra else errors[0]
        loc = _untagged(first["loc"])
        if first["type"] == "union_tag_invalid":  # e.g. a role no message has: name the role
            loc.append(str((first.get("ctx") or {}).get("discriminator", "")).strip("'"))
        param = ".".join(str(p) for p in loc) or None
        if extra:
            raise BadRequest(
                f"{param}: unsupported parameter: edge-agent does not implement it "
                "(docs/api.md lists every field it takes)",
                param=param,
                code=UNSUPPORTED,
            ) from None
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            msg = "required parameter is missing"
        raise BadRequest(f"{param}: {msg}", param=param) from None


def usage_json(usage: Usage) -> dict[str, Any]:
    """OpenAI's usage object; ``prompt_tokens_details.cached_tokens`` is the reused prefix."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def public_finish(reason: str | None) -> str | None:
    """OpenAI's ``stop``, ``length`` and ``tool_calls``; a cancelled or timed-out run reports ``length``."""
    if reason is None:
        return None
    return reason if reason in ("stop", "tool_calls") else "length"


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


def _token(piece: bytes) -> str:
    return piece.decode("utf-8", "replace")


def chat_logprobs(tokens: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
    """``choices[i].logprobs`` of a chat completion (or chunk): one entry per token."""
    if tokens is None:
        return None

    def entry(piece: bytes, logprob: float) -> dict[str, Any]:
        return {"token": _token(piece), "logprob": logprob, "bytes": list(piece)}

    content = [
        {**entry(t.piece, t.logprob), "top_logprobs": [entry(p, lp) for p, lp in t.top]} for t in tokens
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(tokens: Sequence[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    """``choices[i].logprobs`` of a (legacy) completion: parallel lists; ``offset`` is where the
    first token's text starts in the completion."""
    if tokens is None:
        return None
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(_token(t.piece))
    return {
        "tokens": [_token(t.piece) for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{_token(p): lp for p, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def completion_json(
    cid: str,
    model: str,
    text: str,
    finish: str | None,
    usage: Usage,
    created: int | None = None,
    logprobs: Sequence[TokenLogprob] | None = None,
) -> dict[str, Any]:
    choice = {
        "text": text,
        "index": 0,
        "logprobs": completion_logprobs(logprobs),
        "finish_reason": public_finish(finish),
    }
    return _envelope(cid, "text_completion", model, created, [choice], usage)


def completion_chunk_json(
    cid: str, model: str, chunk: GenerationChunk, created: int, logprobs: bool = False, offset: int = 0
) -> dict[str, Any]:
    choice = {
        "text": chunk.text,
        "index": 0,
        "logprobs": completion_logprobs(chunk.logprobs, offset) if logprobs else None,
        "finish_reason": public_finish(chunk.finish_reason),
    }
    return _envelope(cid, "text_completion", model, created, [choice])


def usage_chunk_json(cid: str, model: str, usage: Usage, created: int) -> dict[str, Any]:
    return _envelope(cid, "text_completion", model, created, [], usage)


def chat_json(
    cid: str,
    model: str,
    text: str | None,
    finish: str | None,
    usage: Usage,
    created: int | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    logprobs: Sequence[TokenLogprob] | None = None,
) -> dict[str, Any]:
    """A chat completion; with ``tool_calls`` the content is null and ``finish`` is ``tool_calls``."""
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    choice = {
        "index": 0,
        "message": message,
        "logprobs": chat_logprobs(logprobs),
        "finish_reason": public_finish(finish),
    }
    return _envelope(cid, "chat.completion", model, created, [choice], usage)


def chat_chunk_json(
    cid: str,
    model: str,
    created: int,
    *,
    content: str | None,
    finish: str | None,
    role: bool = False,
    tool_calls: list[dict[str, Any]] | None = None,
    logprobs: Sequence[TokenLogprob] | None = None,
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None:
        delta["content"] = content
    if tool_calls:
        delta["tool_calls"] = tool_calls
    choice = {
        "index": 0,
        "delta": delta,
        "logprobs": chat_logprobs(logprobs),
        "finish_reason": public_finish(finish),
    }
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
    "UNSUPPORTED",
    "ChatBody",
    "AssistantMessage",
    "ChatMessageBody",
    "FunctionCall",
    "FunctionDef",
    "NamedToolChoice",
    "SystemMessage",
    "ToolCall",
    "ToolDef",
    "ToolMessage",
    "UserMessage",
    "content_text",
    "JsonObjectFormat",
    "JsonSchemaFormat",
    "JsonSchemaSpec",
    "ResponseFormat",
    "TextFormat",
    "CompletionBody",
    "EmbeddingBody",
    "GenerationBody",
    "StreamOptions",
    "TextPart",
    "DetokenizeBody",
    "TokenizeBody",
    "chat_chunk_json",
    "chat_logprobs",
    "completion_logprobs",
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
