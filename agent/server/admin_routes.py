"""Operational routes: health, model list, status."""

from __future__ import annotations

import time

from aiohttp import web

from agent import __version__
from agent.server.keys import POOL_KEY, STARTED_KEY


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


def register(router: web.UrlDispatcher) -> None:
    router.add_get("/health", health)
    router.add_get("/v1/models", list_models)
    router.add_get("/admin/status", status)


__all__ = ["health", "list_models", "register", "status"]
