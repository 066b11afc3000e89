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
PARSED_BODY_KEY: web.RequestKey[object] = web.RequestKey("parsed_body", object)
"""A generation body validated by the guard (its role limit checked its token budget); the
handler takes this very object, so the limit and the generation read one value."""

__all__ = ["PARSED_BODY_KEY", "PEER_KEY", "REQUEST_ID_KEY", "LIMITS_KEY", "POOL_KEY", "STARTED_KEY"]
