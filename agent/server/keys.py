"""Typed keys for what the application object carries (shared by the route modules)."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from agent.engine.pool import ModelPool
from agent.server.peercred import PeerCred

POOL_KEY: web.AppKey[ModelPool] = web.AppKey("pool", ModelPool)
STARTED_KEY: web.AppKey[float] = web.AppKey("started", float)
LIMITS_KEY: web.AppKey[dict[str, Any]] = web.AppKey("limits", dict)

REQUEST_ID_KEY: web.RequestKey[str] = web.RequestKey("request_id", str)
PEER_KEY: web.RequestKey[PeerCred | None] = web.RequestKey("peer", PeerCred)

__all__ = ["PEER_KEY", "REQUEST_ID_KEY", "LIMITS_KEY", "POOL_KEY", "STARTED_KEY"]
