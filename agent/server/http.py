"""aiohttp application for the local API, and the server lifecycle around it.

Every response, including aiohttp's own 404/405/413, is JSON in the OpenAI error shape; no
traceback ever reaches a client. Each request carries a request id (``X-Request-Id``, generated
unless the client sent a well-formed one) that appears on every log line of that request. The
caller's Unix identity (SO_PEERCRED) is attached to the request as ``request[PEER_KEY]``.

Shutdown: :meth:`ApiServer.stop` stops accepting, lets in-flight requests (streams included)
finish within the grace period, cancels what remains, and removes the socket file it created.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from agent.engine.pool import ModelPool
from agent.errors import ModelNotReady, RequestError
from agent.health import HealthBook
from agent.server import admin_routes, audit_routes, openai_routes, openapi
from agent.server.audit_routes import AUDIT_KEY
from agent.server.common import translate
from agent.server.guard import GUARD_KEY, Guard, guard_middleware
from agent.server.keys import LIMITS_KEY, PEER_KEY, POOL_KEY, REQUEST_ID_KEY, STARTED_KEY
from agent.server.limits import GuardedSite, ServerLimits, throttle_middleware
from agent.server.listener import remove_socket_file
from agent.server.metrics import Metrics
from agent.server.peercred import peer_credentials
from fleet.log import get_logger

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, peer identity, error translation and one access-log line per request."""
    sent = request.headers.get("X-Request-Id", "")
    rid = sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    peer = peer_credentials(sock)
    request[REQUEST_ID_KEY] = rid
    request[PEER_KEY] = peer
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
        response = translate(exc)
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


def build_app(
    pool: ModelPool,
    limits: dict[str, Any],
    started: float | None = None,
    *,
    guard: Guard | None = None,
    metrics: Metrics | None = None,
    health: HealthBook | None = None,
) -> web.Application:
    """The aiohttp application; ``limits`` holds max_body_bytes, default_max_tokens, request_timeout_s.

    The middleware order is declared here, once, outermost first:

    1. the throttle counter (with ``metrics``): sees the final response, so it counts every 429;
    2. the metrics middleware (with ``metrics``): times and counts every request, refused ones too;
    3. the request context: request id, peer credentials, exceptions into JSON errors;
    4. the guard (with ``guard``): authorizes by the caller's identity and audits the action.
    """
    middlewares: list[Any] = []
    if metrics is not None:
        middlewares += [throttle_middleware(metrics), admin_routes.metrics_middleware]
    if health is not None:
        middlewares.append(admin_routes.health_middleware)
    middlewares.append(request_context)
    if guard is not None:
        middlewares.append(guard_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=limits["max_body_bytes"])
    app[POOL_KEY] = pool
    app[LIMITS_KEY] = limits
    app[STARTED_KEY] = started if started is not None else time.monotonic()
    if metrics is not None:
        app[admin_routes.METRICS_KEY] = metrics
    if health is not None:
        app[admin_routes.HEALTH_KEY] = health
    if guard is not None:
        app[GUARD_KEY] = guard
        app[AUDIT_KEY] = guard.audit
    admin_routes.register(app.router)
    openai_routes.register(app.router)
    audit_routes.register(app.router)
    openapi.register(app.router)
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
        limits: ServerLimits | None = None,
    ) -> None:
        self._app = app
        self._sock = sock
        self._socket_path = socket_path
        self._limits = limits or ServerLimits(
            max_header_bytes=max_header_bytes, keepalive_timeout_s=keepalive_timeout_s
        )
        self._runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=shutdown_grace_s,
            handler_cancellation=True,
            **self._limits.handler_kwargs(),
        )

    async def start(self) -> None:
        await self._runner.setup()
        site = GuardedSite(self._runner, self._sock, self._limits)
        await site.start()

    async def stop(self) -> None:
        """Stop accepting, drain within the grace period, remove the socket file we created."""
        try:
            await self._runner.cleanup()
        finally:
            if self._socket_path is not None:
                remove_socket_file(self._socket_path)


__all__ = ["ApiServer", "build_app"]
