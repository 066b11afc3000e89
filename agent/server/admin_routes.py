"""Operational routes: health, model list, status, metrics, select and pin; the metrics middleware.

``GET /health`` is a liveness probe (``loading`` until the models have loaded). ``GET
/admin/status`` is everything an operator needs at a glance (models, memory, queue, hub, policy,
audit backlog, jobs, watchdog) as JSON; ``edge-agent status`` renders it. ``GET /metrics`` is
the Prometheus text format (404 when ``[metrics] enabled = false``). ``POST /admin/select`` hot-swaps
the default model (409 naming the reason when the new one fails and the old one keeps serving);
``POST /admin/pin`` keeps a model loaded; ``POST /admin/reload`` re-reads the config file
(:mod:`agent.daemon.reload`). Who may call what is the access policy's business.

The metrics middleware (outside all but the throttle counter, :func:`agent.server.http.build_app`)
times every request from its arrival to the end of its response (streams included) and counts it
by route pattern, status and model; tokens come from the response's ``usage`` or from what a streaming route
noted with :func:`agent.server.usage.note_usage`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from datetime import datetime
from typing import Any, Protocol

from aiohttp import web

from agent import __version__
from agent.engine.pool import SwapFailed
from agent.errors import BadRequest, NotFound
from agent.health import HealthBook
from agent.server.common import error_response, read_json
from agent.server.keys import POOL_KEY, STARTED_KEY
from agent.server.metrics import CONTENT_TYPE, Metrics
from agent.server.usage import FIRST_TOKEN_KEY, noted_usage

METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
HEALTH_KEY: web.AppKey[HealthBook] = web.AppKey("health", HealthBook)
INFERENCE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
"""The routes whose outcome and speed count in the per-model health (:mod:`agent.health`)."""


class ReloadOutcome(Protocol):
    """What ``POST /admin/reload`` answers with (:class:`agent.daemon.reload.ReloadReport`)."""

    @property
    def error(self) -> str | None: ...

    @property
    def internal(self) -> bool: ...

    @property
    def store_error(self) -> str | None: ...

    def summary(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class Reloads(Protocol):
    """The daemon's reloader as the route sees it (:class:`agent.daemon.reload.Reloader`)."""

    async def reload(self, trigger: str) -> ReloadOutcome: ...


RELOAD_KEY: web.AppKey[Reloads] = web.AppKey("reloader")
REFUSED_KEY: web.AppKey[Callable[[], list[dict[str, Any]]]] = web.AppKey("refused")
"""The models crash isolation refused (:meth:`agent.engine.isolation.Isolation.refused`), as dicts."""
_MAX_PARSED_BODY = 256 << 10

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def health(request: web.Request) -> web.Response:
    pool = request.app[POOL_KEY]
    states = {row.id: row.state for row in pool.status() if row.state != "retiring"}
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


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _process() -> dict[str, Any]:
    import psutil

    proc = psutil.Process()
    with proc.oneshot():
        mem = proc.memory_info()
        cpu = proc.cpu_times()
        return {
            "pid": os.getpid(),
            "rss_bytes": mem.rss,
            "cpu_seconds": round(cpu.user + cpu.system, 3),
            "threads": proc.num_threads(),
        }


async def status(request: web.Request) -> web.Response:
    """The operator's view (``edge-agent status``); the keys of the first version are kept."""
    pool = request.app[POOL_KEY]
    metrics = request.app.get(METRICS_KEY)
    rows = pool.status()
    body: dict[str, Any] = {
        "version": __version__,
        "uptime_s": round(time.monotonic() - request.app[STARTED_KEY], 3),
        "default_model": pool.default_id,
        "models": [asdict(row) for row in rows],
        "queue_depth": sum(row.queue_depth for row in rows),
        "memory": {"used_bytes": pool.memory_used(), "budget_bytes": pool.memory_budget},
        "max_loaded": pool.max_loaded,
        "keep_alive_s": pool.keep_alive_s,
        "swaps": dict(pool.swaps),
        "process": await asyncio.to_thread(_process),
        "hub": None,
        "policy_version": None,
        "audit_backlog": None,
        "jobs": [],
        "watchdog": None,
        "refused": [],
    }
    refused = request.app.get(REFUSED_KEY)
    if refused is not None:
        body["refused"] = _call(refused)
    if metrics is not None:
        src = metrics.sources
        snap = await metrics.refresh()
        body["audit_backlog"] = snap.audit_backlog
        body["requests_in_flight"] = metrics.active
        if src.hub is not None:
            body["hub"] = _call(lambda: asdict(src.hub()) if src.hub else None)
        if src.policy_version is not None:
            body["policy_version"] = _call(src.policy_version)
        if src.scheduler is not None:
            body["jobs"] = [
                {**asdict(job), "last_run": _iso(job.last_run), "next_run": _iso(job.next_run)}
                for job in src.scheduler.jobs()
            ]
        if src.watchdog is not None:
            dog = src.watchdog
            body["watchdog"] = {"interval_s": dog.interval, "lag_s": round(dog.lag_s, 4), "pings": dog.pings}
    return web.json_response(body, dumps=lambda o: json.dumps(o, default=str))


def _call(read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception as exc:  # one broken source must not hide the rest of the status
        return {"error": f"{type(exc).__name__}: {exc}"}


async def metrics_text(request: web.Request) -> web.Response:
    metrics = request.app.get(METRICS_KEY)
    if metrics is None:
        raise web.HTTPNotFound(reason="metrics are disabled ([metrics] enabled = false)")
    await metrics.refresh()  # the blocking sources, in a thread
    body = metrics.render()  # on the loop: it reads the pool, which only the loop may touch
    response = web.Response(body=body)
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


def _model_of(request: web.Request, body: Any) -> str:
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        raise BadRequest("expected a JSON object with a 'model' id", param="model")
    model: str = body["model"]
    if model not in {m.id for m in request.app[POOL_KEY].models()}:
        known = ", ".join(sorted(m.id for m in request.app[POOL_KEY].models())) or "none"
        raise NotFound(f"model {model!r} is not served here (available: {known})", param="model")
    return model


async def select(request: web.Request) -> web.Response:
    """``POST /admin/select {"model": id}``: hot-swap the default model (smoke test, rollback)."""
    pool = request.app[POOL_KEY]
    model = _model_of(request, await read_json(request))
    info = next(m for m in pool.models() if m.id == model)
    try:
        result = await pool.swap(info)
    except SwapFailed as exc:
        return error_response(409, str(exc), "server_error", exc.reason, "model")
    return web.json_response(asdict(result))


async def pin(request: web.Request) -> web.Response:
    """``POST /admin/pin {"model": id, "pinned": true|false}``: keep a model loaded (or not)."""
    pool = request.app[POOL_KEY]
    body = await read_json(request)
    model = _model_of(request, body)
    pinned = body.get("pinned", True)
    if not isinstance(pinned, bool):
        raise BadRequest("'pinned' must be true or false", param="pinned")
    pool.pin(model, pinned)
    row = next(r for r in pool.status() if r.id == model and r.state != "retiring")
    return web.json_response(asdict(row))


async def reload_config(request: web.Request) -> web.Response:
    """``POST /admin/reload``: re-read the config file and apply what can change without a restart."""
    reloader = request.app.get(RELOAD_KEY)
    if reloader is None:
        message = "this server cannot reload its configuration"
        return error_response(503, message, "server_error", "reload_unavailable")
    return reload_response(await reloader.reload("api"))


def reload_response(report: ReloadOutcome) -> web.Response:
    """The answer to ``POST /admin/reload``: 200 with the report; 400 ``config_error`` for a refused
    config (nothing applied); 500 (``internal_error``, or ``store_reload_failed`` when the live keys
    were applied but the store could not be re-read) for a failure of the agent itself."""
    if report.error is not None and not report.internal:
        return error_response(400, report.error, "invalid_request_error", "config_error")
    if report.error is not None:
        return error_response(
            500, "reload failed: internal error; see the agent's log", "server_error", "internal_error"
        )
    if report.store_error is not None:
        message = f"{report.summary()} (the rest was applied; see the agent's log)"
        return error_response(500, message, "server_error", "store_reload_failed")
    return web.json_response(report.to_dict())


def _route_label(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "other"


def _usage(request: web.Request, response: web.StreamResponse | None) -> tuple[str, int, int]:
    """(model, prompt tokens, completion tokens) of a response, as far as they are known."""
    noted = noted_usage(request)
    model = noted.get("model")
    prompt = noted.get("prompt_tokens", 0)
    completion = noted.get("completion_tokens", 0)
    if model is None and isinstance(response, web.Response) and response.content_type == "application/json":
        raw = response.body
        if isinstance(raw, bytes) and len(raw) <= _MAX_PARSED_BODY:
            try:
                data = json.loads(raw)
            except ValueError:
                data = None
            if isinstance(data, dict) and isinstance(data.get("model"), str):
                model = data["model"]
                usage = data.get("usage")
                if isinstance(usage, dict):
                    prompt = usage.get("prompt_tokens") or 0
                    completion = usage.get("completion_tokens") or 0
    return (model if isinstance(model, str) else "-"), int(prompt or 0), int(completion or 0)


async def _requested_model(request: web.Request) -> str:
    """The served model a JSON request named (else the default); ``-`` for anything unknown, so a
    client cannot create label values. The body was read (and cached by aiohttp) by the handler."""
    if request.method != "POST" or request.content_type != "application/json":
        return "-"
    pool = request.app[POOL_KEY]
    try:
        data = json.loads(await request.read()) if request.body_exists else None
    except (ValueError, UnicodeDecodeError, web.HTTPException, ConnectionError):
        return "-"
    named = data.get("model") if isinstance(data, dict) else None
    wanted = named if isinstance(named, str) and named else pool.default_id
    return wanted if wanted is not None and wanted in {m.id for m in pool.models()} else "-"


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    metrics = request.app.get(METRICS_KEY)
    if metrics is None:
        return await handler(request)
    started = time.monotonic()
    metrics.request_started()
    response: web.StreamResponse | None = None
    code = 500
    try:
        response = await handler(request)
        code = response.status
        return response
    except asyncio.CancelledError:
        code = 499  # the client went away
        raise
    except web.HTTPException as exc:
        code = exc.status
        raise
    finally:
        metrics.request_finished()
        model, prompt, completion = _usage(request, response)
        if model == "-" and response is not None and response.status < 400:
            model = await _requested_model(request)
        metrics.observe_request(
            _route_label(request), request.method, code, model, time.monotonic() - started, prompt, completion
        )


@web.middleware
async def health_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Feed the per-model health book with each inference request: a 5xx (or an exception that
    becomes one) is an error; 4xx are the caller's and not counted; TTFT when the route streamed
    (its first chunk's time, ``FIRST_TOKEN_KEY``), tokens/s over the decode time."""
    if _route_label(request) not in INFERENCE_ROUTES:
        return await handler(request)
    started = time.monotonic()
    response: web.StreamResponse | None = None
    code = 500
    try:
        response = await handler(request)
        code = response.status
        return response
    except web.HTTPException as exc:
        code = exc.status
        raise
    except asyncio.CancelledError:
        code = 499
        raise
    finally:
        if code != 499 and not 400 <= code < 500:
            model, _prompt, completion = _usage(request, response)
            if model == "-" and response is not None and response.status < 400:
                model = await _requested_model(request)
            if model != "-":
                first = request.get(FIRST_TOKEN_KEY)
                request.app[HEALTH_KEY].observe(
                    model,
                    ok=code < 500,
                    ttft_s=first - started if isinstance(first, float) else None,
                    completion_tokens=int(completion or 0),
                    duration_s=time.monotonic() - started,
                )


def register(router: web.UrlDispatcher) -> None:
    router.add_get("/health", health)
    router.add_get("/v1/models", list_models)
    router.add_get("/admin/status", status)
    router.add_get("/metrics", metrics_text)
    router.add_post("/admin/select", select)
    router.add_post("/admin/pin", pin)
    router.add_post("/admin/reload", reload_config)


__all__ = [
    "HEALTH_KEY",
    "METRICS_KEY",
    "REFUSED_KEY",
    "RELOAD_KEY",
    "ReloadOutcome",
    "Reloads",
    "health",
    "list_models",
    "health_middleware",
    "metrics_middleware",
    "metrics_text",
    "pin",
    "register",
    "reload_config",
    "reload_response",
    "select",
    "status",
]
