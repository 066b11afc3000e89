"""``GET /admin/audit``: the newest audit records over the socket, for callers with ``audit.read``.

The guard (:mod:`agent.server.guard`) authorizes the route like any other; this module only reads
the log the guard installed under :data:`AUDIT_KEY`. Without one (an application built without
the guard) the route answers 503, never a traceback.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from agent.audit.store import AuditLog
from agent.errors import BadRequest, Overloaded

AUDIT_KEY: web.AppKey[AuditLog] = web.AppKey("audit_log", AuditLog)
MAX_TAIL = 1000


async def audit_tail(request: web.Request) -> web.Response:
    """``GET /admin/audit?n=50``: the newest records, oldest first, with the log's state."""
    log = request.app.get(AUDIT_KEY)
    if log is None:
        raise Overloaded("no audit log is attached to this server", retry_after=60.0, status=503)
    raw = request.query.get("n", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_TAIL:
        raise BadRequest(f"n must be an integer between 1 and {MAX_TAIL}, got {raw!r}", param="n")
    rows = await asyncio.to_thread(log.tail, int(raw))
    stats = await asyncio.to_thread(log.stats)
    return web.json_response(
        {
            "object": "list",
            "data": [r.record() for r in rows],
            "head_seq": stats.head_seq,
            "backlog": stats.backlog,
            "checkpoint_seq": stats.checkpoint_seq,
            "used_bytes": stats.used_bytes,
            "max_bytes": stats.max_bytes,
        }
    )


def register(router: web.UrlDispatcher) -> None:
    router.add_get("/admin/audit", audit_tail)


__all__ = ["AUDIT_KEY", "MAX_TAIL", "audit_tail", "register"]
