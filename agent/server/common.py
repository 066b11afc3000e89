"""Shared by the route modules: the OpenAI error shape, exception translation, bounded JSON bodies."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from agent.errors import BadRequest, EngineError, ModelNotReady, PayloadTooLarge, RequestError
from agent.server import schemas
from agent.server.keys import LIMITS_KEY

_HTTP_CODES = {
    400: ("invalid_request_error", "bad_request"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


def error_response(
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    param: str | None = None,
    retry_after: float | None = None,
) -> web.Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return web.json_response(schemas.error_json(message, type_, code, param), status=status, headers=headers)


def translate(exc: BaseException) -> web.Response:
    """Map an exception to an OpenAI-shaped error response; never leaks a traceback."""
    if isinstance(exc, RequestError):
        retry = getattr(exc, "retry_after", None)
        return error_response(exc.status, str(exc), exc.type, exc.code, exc.param, retry)
    if isinstance(exc, ModelNotReady):
        return error_response(503, str(exc), "server_error", "model_not_ready", None, exc.retry_after)
    if isinstance(exc, EngineError):
        return error_response(500, str(exc), "server_error", "engine_error")
    if isinstance(exc, web.HTTPException):
        type_, code = _HTTP_CODES.get(exc.status, ("invalid_request_error", None))
        message = exc.reason if exc.status != 413 else "request body too large"
        return error_response(exc.status, message, type_, code)
    return error_response(500, "internal error; see the agent's log", "server_error", "internal_error")


JSON_BODY_KEY: web.RequestKey[object] = web.RequestKey("json_body", object)


def decode_json(raw: bytes) -> Any:
    """Parse a request body; every way it can be wrong is a :class:`BadRequest` naming the problem.

    Besides syntax: UTF-8 is required, nesting deeper than the parser's recursion limit is refused,
    and so are lone UTF-16 surrogates (``"\\udfff"`` is valid JSON but not valid Unicode, and would
    fail later in a tokenizer as a 500).
    """
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        data = json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits (Python's int limit)
        raise BadRequest(f"request body is not valid JSON: {str(exc)[:200]}") from None
    if b"\\ud" in raw.lower():
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("request body contains a lone UTF-16 surrogate (not valid Unicode)") from None
    return data


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, parsed once per request (the access guard and the handler share it).

    413 beyond the configured size, 400 for anything not JSON (see :func:`decode_json`).
    """
    if JSON_BODY_KEY in request:
        return request[JSON_BODY_KEY]
    limit = request.app[LIMITS_KEY]["max_body_bytes"]
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes") from None
    data = decode_json(raw)
    request[JSON_BODY_KEY] = data
    return data


__all__ = ["JSON_BODY_KEY", "decode_json", "error_response", "read_json", "translate"]
