"""What a route tells the audit guard about a request it serves (kept free of server imports).

Invariants: the guard (:mod:`agent.server.guard`) reads the notes after the handler returns and
before the response completes, so they end up in the request's audit record. A streaming route
calls :func:`record_before_done` right before its final event (``data: [DONE]``): the record is
then on disk before the client can see the stream as complete, even a client that stops reading
at ``[DONE]`` instead of at the end of the HTTP body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

USAGE_KEY: web.RequestKey[dict[str, Any]] = web.RequestKey("audit_usage", dict)
FIRST_TOKEN_KEY: web.RequestKey[float] = web.RequestKey("first_token_at", float)
"""``time.monotonic()`` when a streamed response's first chunk came out of the engine."""


class Finisher:
    """Set on the request by the guard: calling it writes the request's record (once)."""

    def __init__(self, write: Callable[[], Awaitable[None]]) -> None:
        self._write = write

    async def __call__(self) -> None:
        await self._write()


FINISH_KEY: web.RequestKey[Finisher] = web.RequestKey("audit_finish", Finisher)


class StreamAudit:
    """Set on the request by the guard for an audited stream: :meth:`start` writes a ``started``
    record durably before the first byte is sent (a log that cannot be written refuses the stream
    with a 503 before any text leaves), :meth:`check` raises while the log cannot be written
    (the stream then stops at once instead of sending text that may go unrecorded)."""

    def __init__(self, start: Callable[[], Awaitable[None]], check: Callable[[], None]) -> None:
        self.start = start
        self.check = check


STREAM_AUDIT_KEY: web.RequestKey[StreamAudit] = web.RequestKey("audit_stream", StreamAudit)


def note_usage(request: web.Request, prompt_tokens: int, completion_tokens: int) -> None:
    """Routes that stream call this with the final usage, so the audit record carries tokens
    (for plain JSON responses the guard reads ``usage`` from the body itself)."""
    request[USAGE_KEY] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


def noted_usage(request: web.Request) -> dict[str, Any]:
    noted = request.get(USAGE_KEY)
    return noted if noted is not None else {}


async def record_before_done(request: web.Request) -> None:
    """Write the request's audit record now (durably); raises the audit log's 503 errors if it
    cannot be written, in which case the stream must not send its final event."""
    finish = request.get(FINISH_KEY)
    if finish is not None:
        await finish()


__all__ = [
    "FINISH_KEY",
    "STREAM_AUDIT_KEY",
    "USAGE_KEY",
    "Finisher",
    "StreamAudit",
    "FIRST_TOKEN_KEY",
    "note_usage",
    "noted_usage",
    "record_before_done",
]
