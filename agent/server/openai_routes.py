"""OpenAI-compatible inference routes: ``/v1/completions`` (plain and SSE streaming)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from typing import Any

from aiohttp import web

from agent.engine.base import Engine, GenerationChunk, Usage
from agent.errors import EngineError, RequestError
from agent.log import get_logger
from agent.server import schemas
from agent.server.common import read_json, translate
from agent.server.keys import LIMITS_KEY, POOL_KEY

log = get_logger(__name__)


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
        err = translate(exc)
        with suppress(ConnectionResetError):
            await response.write(_sse(json.loads(err.text or "{}")))
    finally:
        with suppress(Exception):
            await iterator.aclose()  # type: ignore[attr-defined]
    return response


def register(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/completions", completions)


__all__ = ["completions", "register"]
