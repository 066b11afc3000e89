"""What a route tells the audit guard about a request it served (kept free of server imports).

Invariant: the guard (:mod:`agent.audit.guard`) reads these notes after the handler returns and
before the response completes, so they end up in the request's audit record.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

USAGE_KEY: web.RequestKey[dict[str, Any]] = web.RequestKey("audit_usage", dict)


def note_usage(request: web.Request, prompt_tokens: int, completion_tokens: int) -> None:
    """Routes that stream call this with the final usage, so the audit record carries tokens
    (for plain JSON responses the guard reads ``usage`` from the body itself)."""
    request[USAGE_KEY] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


def noted_usage(request: web.Request) -> dict[str, Any]:
    noted = request.get(USAGE_KEY)
    return noted if noted is not None else {}


__all__ = ["USAGE_KEY", "note_usage", "noted_usage"]
