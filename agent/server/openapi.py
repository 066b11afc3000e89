"""OpenAPI 3.1 description of the local API, served at ``GET /openapi.json``.

Generated, never hand-written: the operations are the application's route table (whatever the
route modules registered, in registration order), the request bodies are the pydantic models of
:mod:`agent.server.schemas` whose docstring starts with ``METHOD /path`` in double backquotes
(e.g. the completions body), and the response bodies are the typed dictionaries below, turned into
JSON Schema by pydantic.

Invariants: every operation documents the error statuses the server can answer with (all in the
OpenAI error shape, ``429``/``503`` with ``Retry-After``); a request model's schema is exactly what
its pydantic validation accepts (``additionalProperties: false``: an unknown field is a 400); the
document is built once per application, on first request, after every route is registered.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from typing import Any, Literal, NotRequired

from aiohttp import web
from pydantic import BaseModel, TypeAdapter
from typing_extensions import TypedDict

from agent import __version__
from agent.server import schemas

_REF = "#/components/schemas/{model}"
_BODY_DOC = re.compile(r"^``(GET|POST|PUT|PATCH|DELETE) (/\S*)``")
_PATH_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}")


class ErrorDetail(TypedDict):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(TypedDict):
    """Every error: the OpenAI shape."""

    error: ErrorDetail


class ModelObject(TypedDict):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(TypedDict):
    object: Literal["list"]
    data: list[ModelObject]


class Health(TypedDict):
    status: Literal["ok", "loading", "no_model", "failed"]
    loading: bool
    version: str
    uptime_s: float
    default_model: str | None
    models: dict[str, str]


class UsageCounts(TypedDict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(TypedDict):
    """OpenAI's legacy shape: parallel lists, one entry per sampled token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(TypedDict):
    text: str
    index: int
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(TypedDict):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[CompletionChoice]
    usage: UsageCounts


class FunctionCallOut(TypedDict):
    name: str
    arguments: str
    """JSON text that validates against the function's parameters."""


class ToolCallOut(TypedDict):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class ChatMessageOut(TypedDict):
    role: Literal["assistant"]
    content: str | None
    """Null when the answer is tool calls."""
    refusal: None
    tool_calls: NotRequired[list[ToolCallOut]]


class TopLogprob(TypedDict):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TypedDict):
    token: str
    logprob: float
    """The log-softmax of the model's logits (logit bias included), before the sampler reshapes them."""
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(TypedDict):
    content: list[TokenLogprobOut]
    refusal: None


class ChatChoice(TypedDict):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletion(TypedDict):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None
    choices: list[ChatChoice]
    usage: UsageCounts


class EmbeddingObject(TypedDict):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str
    """Floats, or base64 of little-endian float32 with ``encoding_format: base64``."""


class EmbeddingUsage(TypedDict):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(TypedDict):
    object: Literal["list"]
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingUsage


class ModelStatus(TypedDict):
    id: str
    state: str
    format: str
    task: str
    path: str
    size_bytes: int
    queue_depth: int


class Status(TypedDict):
    version: str
    uptime_s: float
    default_model: str | None
    models: list[ModelStatus]


class ReloadPolicy(TypedDict):
    changed: bool
    source: str | None
    version: int | None


class ReloadResult(TypedDict):
    """What a configuration reload applied (a refused config is a 400 naming the key)."""

    outcome: Literal["ok"]
    trigger: str
    error: None
    changed: list[str]
    applied: list[str]
    restart_needed: list[str]
    models_added: list[str]
    models_removed: list[str]
    models_kept: list[str]
    policy: ReloadPolicy
    duration_ms: float


class TokenPiece(TypedDict):
    id: int
    piece: str | list[int]
    """The token's text, or its bytes when they are not whole UTF-8."""


class Tokens(TypedDict):
    """``/tokenize``: ids, or ``{"id", "piece"}`` with ``with_pieces``."""

    tokens: list[int] | list[TokenPiece]


class Detokenized(TypedDict):
    content: str


RESPONSE_TYPES: dict[str, type] = {
    "/tokenize": Tokens,
    "/detokenize": Detokenized,
    "/health": Health,
    "/v1/models": ModelList,
    "/v1/completions": Completion,
    "/v1/chat/completions": ChatCompletion,
    "/v1/embeddings": EmbeddingList,
    "/admin/status": Status,
    "/admin/reload": ReloadResult,
}
"""The 200 body of the routes whose shape is known here; other routes document a JSON object."""

TEXT_PATHS: dict[str, str] = {"/metrics": "text/plain"}
"""Routes whose 200 answer is text (Prometheus exposition format), not JSON."""

STREAMING_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})
"""Routes that answer ``stream: true`` with Server-Sent Events."""

_ERRORS = {
    400: "Bad request: malformed JSON, wrong types, invalid parameters, prompt longer than the context, "
    "a config file refused by a reload",
    403: "Denied by the access policy",
    404: "Unknown route or model",
    405: "Method not allowed on this route",
    408: "Request headers or body not received in time",
    413: "Request body larger than server.max_body_bytes",
    414: "Request line longer than server.max_header_bytes",
    429: "The model's queue is full (code overloaded), or the caller's role is over its requests per "
    "minute (code rate_limit_exceeded); retry after Retry-After seconds",
    431: "A header longer than server.max_header_bytes, or more than server.max_headers headers",
    500: "Internal error (logged by the agent; never a traceback)",
    503: "Model not ready, or too many connections; retry after Retry-After seconds",
}
_GET_ERRORS = (403, 404, 405, 408, 414, 431, 500, 503)
_POST_ERRORS = (400, 403, 404, 405, 408, 413, 414, 429, 431, 500, 503)


_SSE_EVENT: dict[str, Any] = {
    "description": "One Server-Sent Event (OpenAPI 3.1: the schema of each event): a JSON chunk, "
    "then `[DONE]` as the last event's data",
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
}


def request_models(module: Any = schemas) -> dict[tuple[str, str], type[BaseModel]]:
    """``(METHOD, path) -> model`` for every pydantic model documented as a request body."""
    found: dict[tuple[str, str], type[BaseModel]] = {}
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, BaseModel) and obj.__module__ == module.__name__:
            match = _BODY_DOC.match(inspect.cleandoc(obj.__doc__ or ""))
            if match:
                found[(match.group(1), match.group(2))] = obj
    return found


class _Components:
    """Collects JSON schemas under ``components.schemas``, returning ``$ref``s to them."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}

    def ref(self, tp: Any, mode: Literal["validation", "serialization"]) -> dict[str, str]:
        name = tp.__name__
        if name not in self.schemas:
            schema = TypeAdapter(tp).json_schema(ref_template=_REF, mode=mode)
            for def_name, definition in schema.pop("$defs", {}).items():
                self.schemas.setdefault(def_name, definition)
            self.schemas[name] = schema
        return {"$ref": _REF.format(model=name)}


def _summary(handler: Any) -> str:
    doc = inspect.getdoc(handler) or ""
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    return first or getattr(handler, "__name__", "operation").replace("_", " ")


def _error_responses(components: _Components) -> dict[str, Any]:
    """``components.responses``: one reusable entry per error status."""
    error = {"application/json": {"schema": components.ref(ErrorResponse, "serialization")}}
    out: dict[str, Any] = {}
    for status, description in _ERRORS.items():
        entry: dict[str, Any] = {"description": description, "content": error}
        if status in (429, 503):
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying",
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
        out[f"Error{status}"] = entry
    return out


def _responses(method: str, path: str, components: _Components) -> dict[str, Any]:
    ok_type = RESPONSE_TYPES.get(path)
    ok_schema = components.ref(ok_type, "serialization") if ok_type is not None else {"type": "object"}
    ok_content: dict[str, Any] = {"application/json": {"schema": ok_schema}}
    if path in TEXT_PATHS:
        ok_content = {TEXT_PATHS[path]: {"schema": {"type": "string"}}}
    if path in STREAMING_PATHS:
        ok_content["text/event-stream"] = {"schema": _SSE_EVENT}
    responses: dict[str, Any] = {"200": {"description": "OK", "content": ok_content}}
    for status in _POST_ERRORS if method != "GET" else _GET_ERRORS:
        responses[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    return responses


def _operation_id(method: str, path: str) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "_", path).strip("_") or "root"
    return f"{method.lower()}_{words}"


def build_spec(
    routes: Iterable[tuple[str, str, Any]], models: dict[tuple[str, str], type[BaseModel]] | None = None
) -> dict[str, Any]:
    """The OpenAPI document for ``(method, path, handler)`` routes (pure)."""
    models = request_models() if models is None else models
    components = _Components()
    error_responses = _error_responses(components)
    paths: dict[str, dict[str, Any]] = {}
    for method, path, handler in routes:
        if method in ("HEAD", "OPTIONS", "*"):
            continue
        operation: dict[str, Any] = {
            "operationId": _operation_id(method, path),
            "summary": _summary(handler),
            "responses": _responses(method, path, components),
        }
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PATH_PARAM.findall(path)
        ]
        if params:
            operation["parameters"] = params
        model = models.get((method, path))
        if model is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": components.ref(model, "validation")}},
            }
        paths.setdefault(path, {})[method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edge-agent local API",
            "version": __version__,
            "description": (
                "OpenAI-compatible HTTP/1.1 over the agent's Unix socket "
                "(e.g. `curl --unix-socket /run/edge-agent/edge-agent.sock http://localhost/health`). "
                "Limits and their settings: docs/api.md."
            ),
        },
        "servers": [{"url": "http://localhost", "description": "the Unix socket (any host name)"}],
        "paths": paths,
        "components": {"schemas": components.schemas, "responses": error_responses},
    }


def app_routes(router: web.UrlDispatcher) -> list[tuple[str, str, Any]]:
    """``(method, path, handler)`` for each route of an aiohttp router, in registration order."""
    out = []
    for route in router.routes():
        info = route.resource.canonical if route.resource is not None else ""
        out.append((route.method, info, route.handler))
    return out


def register(router: web.UrlDispatcher) -> None:
    """Add ``GET /openapi.json``; the document is built on its first request and then reused."""
    cache: list[dict[str, Any]] = []

    async def openapi_json(request: web.Request) -> web.Response:
        """The OpenAPI 3.1 description of this API."""
        if not cache:
            cache.append(build_spec(app_routes(request.app.router)))
        return web.json_response(cache[0])

    router.add_get("/openapi.json", openapi_json)


__all__ = [
    "RESPONSE_TYPES",
    "STREAMING_PATHS",
    "TEXT_PATHS",
    "ChatCompletion",
    "Detokenized",
    "Tokens",
    "Completion",
    "EmbeddingList",
    "ErrorResponse",
    "Health",
    "ModelList",
    "ReloadResult",
    "Status",
    "app_routes",
    "build_spec",
    "register",
    "request_models",
]
