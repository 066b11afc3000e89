"""aiohttp application for the local API, and the server lifecycle around it.

Every response, including aiohttp's own 404/405/413, is JSON in the OpenAI error shape; no
traceback ever reaches a client. Each request carries a request id (``X-Request-Id``, generated
unless the client sent a well-formed one) that appears on every log line of that request. The
caller's Unix identity (SO_PEERCRED) is attached to the request as ``request["peer"]``.

Shutdown: :meth:`ApiServer.stop` stops accepting, lets in-flight requests (streams included)
finish within the grace period, cancels what remains, and removes the socket file it created.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from agent import __version__
from agent.engine.base import Engine, GenerationChunk, Usage
from agent.engine.pool import ModelPool
from agent.errors import BadRequest, EngineError, ModelNotReady, PayloadTooLarge, RequestError
from agent.log import get_logger
from agent.server import schemas
from agent.server.peercred import peer_credentials

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_HTTP_CODES = {
    400: ("invalid_request_error", "bad_request"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
}

POOL_KEY: web.AppKey[ModelPool] = web.AppKey("pool", ModelPool)
STARTED_KEY: web.AppKey[float] = web.AppKey("started", float)
LIMITS_KEY: web.AppKey[dict[str, Any]] = web.AppKey("limits", dict)


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


def _translate(exc: BaseException) -> web.Response:
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


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, peer identity, error translation and one access-log line per request."""
    sent = request.headers.get("X-Request-Id", "")
    rid = sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    peer = peer_credentials(sock)
    request["request_id"] = rid
    request["peer"] = peer
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(
        request_id=rid,
        peer_pid=peer.pid if peer else None,
        peer_uid=peer.uid if peer else None,
    )
    start = time.monotonic()
    response: web.StreamResponse
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        log.info("request_cancelled", method=request.method, path=request.path)
        raise
    except Exception as exc:  # translated to a JSON error; logged with traceback when unexpected
        if not isinstance(exc, RequestError | ModelNotReady | web.HTTPException):
            log.exception("request_failed", method=request.method, path=request.path)
        response = _translate(exc)
    if not response.prepared:
        response.headers["X-Request-Id"] = rid
    log.info(
        "request",
        method=request.method,
        path=request.path,
        status=response.status,
        duration_ms=round((time.monotonic() - start) * 1000, 2),
    )
    return response


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; 413 beyond the configured size, 400 for anything not JSON."""
    limit = request.app[LIMITS_KEY]["max_body_bytes"]
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body of {request.content_length} bytes exceeds {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes") from None
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise BadRequest("request body is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc.msg} at position {exc.pos}") from None


async def health(request: web.Request) -> web.Response:
    pool = request.app[POOL_KEY]
    states = {e.info.id: e.state.value for e in pool.engines()}
    if not states:
        status = "no_model"
    elif pool.loading:
        status = "loading"
    elif all(s == "failed" for s in states.values()):
        status = "failed"
    else:
        status = "ok"
    body = {
        "status": status,
        "loading": pool.loading,
        "version": __version__,
        "uptime_s": round(time.monotonic() - request.app[STARTED_KEY], 3),
        "default_model": pool.default_id,
        "models": states,
    }
    return web.json_response(body, status=503 if status == "failed" else 200)


async def list_models(request: web.Request) -> web.Response:
    pool = request.app[POOL_KEY]
    data = [
        {"id": m.id, "object": "model", "created": m.created, "owned_by": "edge-agent"} for m in pool.models()
    ]
    return web.json_response({"object": "list", "data": data})


async def status(request: web.Request) -> web.Response:
    pool = request.app[POOL_KEY]
    models = [
        {
            "id": e.info.id,
            "state": e.state.value,
            "format": e.info.format,
            "task": e.info.task,
            "path": str(e.info.path),
            "size_bytes": e.info.size_bytes,
            "queue_depth": e.queue_depth,
        }
        for e in pool.engines()
    ]
    return web.json_response(
        {
            "version": __version__,
            "uptime_s": round(time.monotonic() - request.app[STARTED_KEY], 3),
            "default_model": pool.default_id,
            "models": models,
        }
    )


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def completions(request: web.Request) -> web.StreamResponse:
    body = schemas.parse_body(schemas.CompletionBody, await read_json(request))
    pool = request.app[POOL_KEY]
    engine = pool.resolve(body.model)
    limits = request.app[LIMITS_KEY]
    rid = request["request_id"]
    req = body.to_request(limits["default_max_tokens"], rid, time.monotonic() + limits["request_timeout_s"])
    cid = f"cmpl-{rid}"
    created = int(time.time())
    if not body.stream:
        texts: list[str] = [req.prompt] if body.echo else []
        last = GenerationChunk(text="")
        async for chunk in engine.generate(req):
            texts.append(chunk.text)
            last = chunk
        usage = last.usage or Usage(0, 0)
        return web.json_response(
            schemas.completion_json(cid, engine.info.id, "".join(texts), last.finish_reason, usage, created)
        )
    return await _stream(request, engine, engine.generate(req), cid, created, body)


async def _stream(
    request: web.Request,
    engine: Engine,
    chunks: AsyncIterator[GenerationChunk],
    cid: str,
    created: int,
    body: schemas.CompletionBody,
) -> web.StreamResponse:
    """Send SSE chunks. Refusals (400/429/503) surface before the first byte is sent."""
    iterator = aiter(chunks)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        first = GenerationChunk(text="", finish_reason="stop", usage=Usage(0, 0))
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Request-Id": request["request_id"],
        }
    )
    await response.prepare(request)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    model = engine.info.id
    try:
        if body.echo:
            await response.write(
                _sse(schemas.completion_chunk_json(cid, model, GenerationChunk(body.prompt_text), created))
            )
        chunk: GenerationChunk | None = first
        while chunk is not None:
            await response.write(_sse(schemas.completion_chunk_json(cid, model, chunk, created)))
            if chunk.finish_reason is not None:
                if include_usage and chunk.usage is not None:
                    await response.write(_sse(schemas.usage_chunk_json(cid, model, chunk.usage, created)))
                break
            chunk = await anext(iterator, None)
        await response.write(_sse("[DONE]"))
    except (ConnectionResetError, ConnectionAbortedError):
        log.info("client_gone", request_id=request["request_id"])
    except (RequestError, EngineError) as exc:
        err = _translate(exc)
        with suppress(ConnectionResetError):
            await response.write(_sse(json.loads(err.text or "{}")))
    finally:
        with suppress(Exception):
            await iterator.aclose()  # type: ignore[attr-defined]
    return response


def build_app(pool: ModelPool, limits: dict[str, Any], started: float | None = None) -> web.Application:
    """The aiohttp application; ``limits`` holds max_body_bytes, default_max_tokens, request_timeout_s."""
    app = web.Application(middlewares=[request_context], client_max_size=limits["max_body_bytes"])
    app[POOL_KEY] = pool
    app[LIMITS_KEY] = limits
    app[STARTED_KEY] = started if started is not None else time.monotonic()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/admin/status", status)
    return app


class ApiServer:
    """Runs an aiohttp application on a listening Unix socket with a bounded graceful stop."""

    def __init__(
        self,
        app: web.Application,
        sock: socket.socket,
        *,
        socket_path: Path | None,
        shutdown_grace_s: float = 10.0,
        max_header_bytes: int = 16 << 10,
        keepalive_timeout_s: float = 75.0,
    ) -> None:
        self._app = app
        self._sock = sock
        self._socket_path = socket_path
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=shutdown_grace_s,
            handler_cancellation=True,
            keepalive_timeout=keepalive_timeout_s,
            max_line_size=max_header_bytes,
            max_field_size=max_header_bytes,
        )

    async def start(self) -> None:
        await self._runner.setup()
        site = web.SockSite(self._runner, self._sock)
        await site.start()

    async def stop(self) -> None:
        """Stop accepting, drain within the grace period, remove the socket file we created."""
        try:
            await self._runner.cleanup()
        finally:
            if self._socket_path is not None:
                with suppress(FileNotFoundError):
                    self._socket_path.unlink()


__all__ = ["ApiServer", "build_app", "error_response", "read_json"]
