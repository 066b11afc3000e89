"""Typed keys for what the application object carries (shared by the route modules)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from agent.engine.pool import ModelPool

POOL_KEY: web.AppKey[ModelPool] = web.AppKey("pool", ModelPool)
STARTED_KEY: web.AppKey[float] = web.AppKey("started", float)
LIMITS_KEY: web.AppKey[dict[str, Any]] = web.AppKey("limits", dict)

__all__ = ["LIMITS_KEY", "POOL_KEY", "STARTED_KEY"]
