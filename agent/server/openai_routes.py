"""OpenAI-compatible inference routes: ``/v1/completions`` and ``/v1/chat/completions`` (plain and
SSE streaming) and ``/v1/embeddings``.

Invariants: refusals (400/404/429/503) surface before the first byte of a stream is sent, so they
arrive as ordinary JSON errors; a stream always ends with ``data: [DONE]`` unless the client
went away; a client that disconnects mid-stream closes the engine's iterator, which cancels the
generation and frees its slot.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import suppress
from dataclasses import replace
from typing import Any

from aiohttp import web

from agent.engine.base import GenerationChunk, TokenLogprob, Usage
from agent.errors import BadRequest, EngineError, RequestError
from agent.server import schemas, tools
from agent.server.common import read_json, translate
from agent.server.keys import LIMITS_KEY, PARSED_BODY_KEY, POOL_KEY, REQUEST_ID_KEY
from agent.server.usage import FIRST_TOKEN_KEY, STREAM_AUDIT_KEY, note_usage, record_before_done
from fleet.log import get_logger

log = get_logger(__name__)

ChunkJson = Callable[[GenerationChunk, bool], dict[str, Any] | None]
"""Builds the SSE payload of one chunk (None: nothing to send for it; never for the final chunk);
the flag is true for the first chunk of the stream."""
UsageJson = Callable[[Usage], dict[str, Any]]


def _sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def _begin(request: web.Request, model: type[Any], task: str) -> tuple[Any, Any, Any, str]:
    """Parse and resolve a generation request: ``(body, engine, engine request, id prefix)``; a
    body naming no model goes to the default of ``task`` (a chat model for chat).

    The body the guard validated (and whose token budget it held against the caller's role) is
    used as it is; only without a guard is it parsed here."""
    kept = request.get(PARSED_BODY_KEY)
    body = kept if isinstance(kept, model) else schemas.parse_body(model, await read_json(request))
    engine = request.app[POOL_KEY].resolve(body.model, task)
    limits = request.app[LIMITS_KEY]
    rid = request[REQUEST_ID_KEY]
    deadline = time.monotonic() + limits["request_timeout_s"]
    return body, engine, body.to_request(limits["default_max_tokens"], rid, deadline), rid


async def _collect(
    chunks: AsyncIterator[GenerationChunk], prefix: str = ""
) -> tuple[str, GenerationChunk, list[TokenLogprob]]:
    """A whole generation: its text, its final chunk (``finish_reason``, ``usage``) and the log
    probabilities of its tokens (when asked for)."""
    texts = [prefix]
    logprobs: list[TokenLogprob] = []
    last = GenerationChunk(text="")
    async for chunk in chunks:
        texts.append(chunk.text)
        logprobs.extend(chunk.logprobs)
        last = chunk
    return "".join(texts), last, logprobs


def _include_usage(body: Any) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


async def completions(request: web.Request) -> web.StreamResponse:
    body, engine, req, rid = await _begin(request, schemas.CompletionBody, "completion")
    cid, model, created = f"cmpl-{rid}", engine.info.id, int(time.time())
    want_logprobs = req.sampling.logprobs is not None
    if not body.stream:
        text, last, logprobs = await _collect(engine.generate(req), req.prompt if body.echo else "")
        usage = last.usage or Usage(0, 0)
        doc = schemas.completion_json(
            cid, model, text, last.finish_reason, usage, created, logprobs if want_logprobs else None
        )
        return web.json_response(doc)
    offset = [0]

    def chunk_json(chunk: GenerationChunk, first: bool) -> dict[str, Any]:
        if first and body.echo:
            chunk = replace(chunk, text=body.prompt_text + chunk.text)
        doc = schemas.completion_chunk_json(cid, model, chunk, created, want_logprobs, offset[0])
        offset[0] += sum(len(t.piece.decode("utf-8", "replace")) for t in chunk.logprobs)
        return doc

    def usage_json(usage: Usage) -> dict[str, Any]:
        return schemas.usage_chunk_json(cid, model, usage, created)

    return await _stream(request, engine.generate(req), chunk_json, usage_json, _include_usage(body))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body, engine, req, rid = await _begin(request, schemas.ChatBody, "chat")
    cid, model, created = f"chatcmpl-{rid}", engine.info.id, int(time.time())
    plan = tools.plan_tools(body)
    if plan is not None:
        grammar = plan.grammar if plan.grammar is not None else req.sampling.grammar
        req = replace(req, messages=plan.messages, sampling=replace(req.sampling, grammar=grammar))
    calls = tools.ToolCallStream() if plan is not None and plan.mode != "none" else None
    want_logprobs = req.sampling.logprobs is not None
    if not body.stream:
        text, last, all_logprobs = await _collect(engine.chat(req))
        usage = last.usage or Usage(0, 0)
        logprobs = all_logprobs if want_logprobs else None
        if calls is not None and last.finish_reason == "stop":
            calls.feed(text)
            if calls.called:
                doc = schemas.chat_json(
                    cid, model, None, "tool_calls", usage, created, calls.final_calls(), logprobs
                )
                return web.json_response(doc)
        doc = schemas.chat_json(cid, model, text, last.finish_reason, usage, created, None, logprobs)
        return web.json_response(doc)

    started = [False]

    def chunk_json(chunk: GenerationChunk, first: bool) -> dict[str, Any] | None:
        text, deltas = (chunk.text, []) if calls is None else calls.feed(chunk.text)
        finish: str | None = chunk.finish_reason
        if finish == "stop" and calls is not None and calls.called:
            finish = "tool_calls"
        if not text and not deltas and finish is None and started[0] and not chunk.logprobs:
            return None  # a piece of a call's head: sent once the name is complete
        role, started[0] = not started[0], True
        content = text if text or (finish is None and not deltas) else None
        return schemas.chat_chunk_json(
            cid,
            model,
            created,
            content=content,
            finish=finish,
            role=role,
            tool_calls=[d.json() for d in deltas],
            logprobs=chunk.logprobs if want_logprobs else None,
        )

    def usage_json(usage: Usage) -> dict[str, Any]:
        return schemas.chat_usage_chunk_json(cid, model, usage, created)

    return await _stream(request, engine.chat(req), chunk_json, usage_json, _include_usage(body))


async def embeddings(request: web.Request) -> web.StreamResponse:
    body = schemas.parse_body(schemas.EmbeddingBody, await read_json(request))
    pool = request.app[POOL_KEY]
    engine = pool.resolve(body.model)
    result = await engine.embed(body.texts)
    dim = len(result.vectors[0]) if result.vectors else 0
    if body.dimensions is not None and body.dimensions != dim:
        raise BadRequest(
            f"dimensions: model {engine.info.id} produces {dim}-dimensional vectors, not {body.dimensions}",
            param="dimensions",
        )
    return web.json_response(
        schemas.embedding_json(engine.info.id, result.vectors, result.prompt_tokens, body.encoding_format)
    )


async def _stream(
    request: web.Request,
    chunks: AsyncIterator[GenerationChunk],
    chunk_json: ChunkJson,
    usage_json: UsageJson,
    include_usage: bool,
) -> web.StreamResponse:
    """Send SSE chunks. Refusals (400/429/503) surface before the first byte is sent.

    An audited stream has a ``started`` record on disk before its first byte (a log that cannot be
    written is a 503 with nothing sent), stops at the next chunk once the log cannot be written
    (an error event, no ``[DONE]``), and has its final record on disk before ``[DONE]``."""
    iterator = aiter(chunks)
    try:
        first = await anext(iterator)
    except StopAsyncIteration:
        first = GenerationChunk(text="", finish_reason="stop", usage=Usage(0, 0))
    request[FIRST_TOKEN_KEY] = time.monotonic()  # the per-model health's time to first token
    audit = request.get(STREAM_AUDIT_KEY)
    if audit is not None:
        try:
            await audit.start()
        except BaseException:
            with suppress(Exception):
                await iterator.aclose()  # type: ignore[attr-defined]
            raise
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Request-Id": request[REQUEST_ID_KEY],
        }
    )
    await response.prepare(request)
    try:
        chunk: GenerationChunk | None = first
        is_first = True
        while chunk is not None:
            if audit is not None:
                audit.check()  # raises AuditUnavailable: stop now, not only before [DONE]
            payload = chunk_json(chunk, is_first)
            if payload is not None:
                await response.write(_sse(payload))
            is_first = False
            if chunk.finish_reason is not None:
                if chunk.usage is not None:  # the audit record carries the tokens
                    note_usage(request, chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
                if include_usage and chunk.usage is not None:
                    await response.write(_sse(usage_json(chunk.usage)))
                break
            chunk = await anext(iterator, None)
        await record_before_done(request)  # durable before the client sees the stream complete
        await response.write(_sse("[DONE]"))
    except (ConnectionResetError, ConnectionAbortedError):
        log.info("client_gone", request_id=request[REQUEST_ID_KEY])
    except (RequestError, EngineError) as exc:
        err = translate(exc)
        with suppress(ConnectionResetError):
            await response.write(_sse(json.loads(err.text or "{}")))
    finally:
        with suppress(Exception):
            await iterator.aclose()  # type: ignore[attr-defined]
    return response


def _tokenizer(request: web.Request, model: str | None) -> Any:
    engine = request.app[POOL_KEY].resolve(model)
    if not hasattr(engine, "detokenize"):
        raise BadRequest(
            f"model: {engine.info.id} has no llama.cpp vocabulary to (de)tokenize with", param="model"
        )
    return engine


async def tokenize(request: web.Request) -> web.StreamResponse:
    """Token ids of a text, as llama.cpp's server answers ``/tokenize``."""
    body = schemas.parse_body(schemas.TokenizeBody, await read_json(request))
    engine = _tokenizer(request, body.model)
    ids = engine.tokenize(body.content, add_bos=body.add_special)
    if not body.with_pieces:
        return web.json_response({"tokens": ids})
    _, pieces = engine.detokenize(ids)
    out = []
    for token, piece in zip(ids, pieces, strict=True):
        try:
            text: str | list[int] = piece.decode("utf-8")
        except UnicodeDecodeError:
            text = list(piece)
        out.append({"id": token, "piece": text})
    return web.json_response({"tokens": out})


async def detokenize(request: web.Request) -> web.StreamResponse:
    """The text of token ids, as llama.cpp's server answers ``/detokenize``."""
    body = schemas.parse_body(schemas.DetokenizeBody, await read_json(request))
    text, _ = _tokenizer(request, body.model).detokenize(body.tokens)
    return web.json_response({"content": text})


def register(router: web.UrlDispatcher) -> None:
    router.add_post("/v1/completions", completions)
    router.add_post("/v1/chat/completions", chat_completions)
    router.add_post("/v1/embeddings", embeddings)
    router.add_post("/tokenize", tokenize)
    router.add_post("/detokenize", detokenize)


__all__ = ["chat_completions", "completions", "detokenize", "embeddings", "register", "tokenize"]
