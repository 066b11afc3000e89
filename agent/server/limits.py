"""Connection limits of the local API: how much a client may send, how slowly, and how many at once.

The socket is the box's front door: any local process that can connect can try to exhaust the
daemon. This module bounds every resource a connection can hold:

- ``max_connections``: connections open at once. Beyond it a new connection gets one
  ``503`` JSON error with ``Retry-After`` (after its request headers arrive) and is closed; beyond
  twice the limit it is closed at once without reading anything.
- ``max_header_bytes`` (request line and each header field) and ``max_headers`` (their count):
  beyond them the request gets ``431`` (``414`` for a request line) and the connection is closed.
- ``max_body_bytes``: enforced by the application (``413``); a body left unread after a response
  closes the connection instead of being drained.
- ``header_timeout_s``: a request's header block must arrive in full within this time of its first
  byte (slow-loris); otherwise ``408`` and close. A connection that sends nothing at all within this
  time of being opened is closed silently (a client racing a silent close must retry anyway).
- ``body_timeout_s``: a request body must arrive in full within this time of the end of its
  headers; otherwise the handler's read fails with :class:`RequestTimeout` (``408``) and the
  connection is closed.
- ``write_timeout_s``: a response may not stay blocked on a client that does not read for longer
  than this (the transport's write buffer above its high-water mark); the connection is aborted,
  which cancels the handler and frees any generation slot it holds.
- ``keepalive_timeout_s``: an idle keep-alive connection is closed after this (aiohttp's own timer).

Every limit that fires is reported to the site's :class:`LimitEvents` sink (the daemon's
:class:`agent.server.metrics.Metrics`, which exports them on ``GET /metrics``): refused and dropped
connections, timeouts by phase, requests rejected before the application saw them, requests
throttled with ``429`` (rate limit, full queue: :func:`throttle_middleware`), and the open
connections against the limit. Label values are bounded: each method takes one of a fixed set.

Invariants: every response this module writes itself is an OpenAI-shaped JSON error with
``Connection: close``; a connection is counted from ``connection_made`` to ``connection_lost``
exactly once; every timer a connection starts is cancelled when it is lost.

The guard is a subclass of aiohttp's ``RequestHandler`` (the per-connection protocol), served by
:class:`GuardedSite` on a listening socket. It relies on two details of aiohttp's handler, pinned
by the tests in ``tests/fuzz``: ``_request_count`` grows by one per parsed request head, and
``_messages`` holds the parsed ``(message, payload)`` pairs not yet handled.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from agent.errors import RequestError
from agent.server.common import translate
from fleet.log import get_logger

log = get_logger(__name__)

_REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


RefusalReason = Literal["over_limit", "dropped"]
"""``over_limit``: answered ``503`` and closed; ``dropped``: closed unread (beyond twice the limit)."""
TimeoutPhase = Literal["idle", "headers", "body", "write"]
"""``idle``: nothing sent at all; ``headers``/``body``: incomplete in time (``408``); ``write``: the
client stopped reading (connection aborted)."""
ThrottleReason = Literal["rate_limit", "queue_full"]
"""Why a request was answered ``429``: the caller's role budget, or the model's full queue."""

REJECTED_STATUSES = ("400", "414", "417", "431", "500")
"""Statuses of requests rejected before the application saw them; any other one is ``other``."""


class LimitEvents(Protocol):
    """Where a site reports the limits that fire; every argument comes from a fixed set."""

    def connections_changed(self, open_: int, limit: int) -> None:
        """Connections now open on the site, and its ``max_connections``."""

    def connection_refused(self, reason: RefusalReason) -> None: ...

    def request_timed_out(self, phase: TimeoutPhase) -> None: ...

    def request_rejected(self, status: str) -> None:
        """A request answered before the application saw it; ``status`` from :func:`rejected_label`."""

    def request_throttled(self, reason: ThrottleReason) -> None: ...


class NoEvents:
    """The sink of a site nobody watches: every event is ignored."""

    def connections_changed(self, open_: int, limit: int) -> None:
        pass

    def connection_refused(self, reason: RefusalReason) -> None:
        pass

    def request_timed_out(self, phase: TimeoutPhase) -> None:
        pass

    def request_rejected(self, status: str) -> None:
        pass

    def request_throttled(self, reason: ThrottleReason) -> None:
        pass


def rejected_label(status: int) -> str:
    """The bounded ``status`` label of a rejected request (pure)."""
    text = str(status)
    return text if text in REJECTED_STATUSES else "other"


class RequestTimeout(RequestError):
    """The client did not send its request (headers or body) in time: HTTP 408."""

    status = 408
    code = "request_timeout"


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """The limits one listening socket enforces; see the module docstring for each one."""

    max_connections: int = 256
    max_header_bytes: int = 16 << 10
    max_headers: int = 64
    max_body_bytes: int = 1 << 20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    events: LimitEvents = field(default_factory=NoEvents, compare=False, repr=False)
    """Where the site reports the limits that fire (not a limit; not read from settings)."""

    @classmethod
    def from_settings(cls, server: Any, events: LimitEvents | None = None) -> ServerLimits:
        """Build from ``agent.config.ServerSettings`` (any object with the same attribute names)."""
        defaults = cls()
        names = [name for name in cls.__slots__ if name != "events"]
        values = {name: getattr(server, name, getattr(defaults, name)) for name in names}
        return cls(**values, events=events or NoEvents())

    def handler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of aiohttp's ``RequestHandler`` (and ``AppRunner``) for these limits."""
        return {
            "keepalive_timeout": self.keepalive_timeout_s,
            "max_line_size": self.max_header_bytes,
            "max_field_size": self.max_header_bytes,
            "max_headers": self.max_headers,
        }


class ConnectionCounter:
    """Open connections of one site. ``refuse`` and ``drop`` say what to do with the newest one.

    Every change of ``active`` is reported to ``events`` (and the limit once, at creation).
    """

    def __init__(self, limit: int, events: LimitEvents | None = None) -> None:
        self.limit = limit
        self.active = 0
        self.refused = 0
        self.events: LimitEvents = events or NoEvents()
        self.events.connections_changed(0, limit)

    def opened(self) -> int:
        self.active += 1
        self.events.connections_changed(self.active, self.limit)
        return self.active

    def closed(self) -> None:
        self.active -= 1
        self.events.connections_changed(self.active, self.limit)

    def refused_one(self, reason: RefusalReason) -> None:
        self.refused += 1
        self.events.connection_refused(reason)

    def refuse(self, count: int) -> bool:
        """Above the limit: answer 503 and close."""
        return count > self.limit

    def drop(self, count: int) -> bool:
        """Far above the limit: close without reading."""
        return count > 2 * self.limit


def error_body(status: int, message: str, code: str) -> bytes:
    type_ = "server_error" if status >= 500 else "invalid_request_error"
    error = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return json.dumps(error, separators=(",", ":")).encode()


def raw_error_response(status: int, message: str, code: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 error response with a JSON body and ``Connection: close`` (pure)."""
    body = error_body(status, message, code)
    head = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def classify_parse_error(exc: BaseException | None, status: int) -> tuple[int, str, str]:
    """``(status, code, message)`` for an error aiohttp raised before the application saw the request."""
    if isinstance(exc, LineTooLong):
        text = str(exc)
        if "b'/" in text or "reading: '/" in text:
            return 414, "uri_too_long", "request line is too long"
        return 431, "headers_too_large", "a request header is too long"
    if isinstance(exc, BadHttpMessage):
        if "Too many headers" in str(exc):
            return 431, "headers_too_large", "too many request headers"
        return 400, "bad_http_request", f"malformed HTTP request: {exc.message}"
    if status >= 500:
        return 500, "internal_error", "internal error; see the agent's log"
    return status, "bad_http_request", "malformed HTTP request"


class GuardedRequestHandler(RequestHandler):
    """aiohttp's per-connection protocol with the timers and counters of :class:`ServerLimits`."""

    __slots__ = (
        "_body_timer",
        "_counted",
        "_counter",
        "_header_timer",
        "_limits",
        "_partial",
        "_pending_body",
        "_refused",
        "_refused_tail",
        "_timed_out",
        "_write_timer",
    )

    def __init__(
        self, manager: web.Server, *, limits: ServerLimits, counter: ConnectionCounter, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._counter = counter
        self._counted = False
        self._refused = False
        self._refused_tail = b""
        self._partial = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._pending_body: Any = None
        self._timed_out = False

    # -- lifecycle -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        count = self._counter.opened()
        self._counted = True
        if self._counter.drop(count):
            self._counter.refused_one("dropped")
            log.warning("connection_dropped", active=count, limit=self._counter.limit)
            transport.abort()  # type: ignore[attr-defined]
            return
        super().connection_made(transport)
        if self._counter.refuse(count):
            self._refused = True
            self._counter.refused_one("over_limit")
            log.warning("connection_refused", active=count, limit=self._counter.limit)
        self._arm_header_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._header_timer, self._body_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = self._write_timer = None
        self._pending_body = None
        if self._counted:
            self._counted = False
            self._counter.closed()
        super().connection_lost(exc)

    # -- reading ---------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._refuse_when_headers_end(data)
            return
        before = self._request_count
        super().data_received(data)
        if self.transport is None:
            return
        if self._pending_body is not None and self._pending_body.is_eof():
            self._cancel_body_timer()
        if self._request_count > before:
            # One or more request heads completed: the header clock stops; the last request's
            # body (if any) starts the body clock. Earlier ones in this chunk are complete.
            self._partial = False
            self._cancel_header_timer()
            if self._messages:
                payload = self._messages[-1][1]
                if not payload.is_eof():
                    self._arm_body_timer(payload)
        elif data and self._pending_body is None:
            # Bytes of a request head that is not complete yet.
            self._partial = True
            if self._header_timer is None:
                self._arm_header_timer()

    def _refuse_when_headers_end(self, data: bytes) -> None:
        seen = self._refused_tail + data
        if b"\r\n\r\n" in seen or len(seen) > self._limits.max_header_bytes:
            self._write_and_close(
                raw_error_response(
                    503,
                    f"too many connections (limit {self._counter.limit}); retry shortly",
                    "too_many_connections",
                    retry_after=1,
                )
            )
            return
        self._refused_tail = seen[-3:]

    def _write_and_close(self, raw: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(raw)
        self.force_close()

    # -- timers ----------------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self._loop.call_later(self._limits.header_timeout_s, self._header_expired)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_expired(self) -> None:
        self._header_timer = None
        if self.transport is None:
            return
        if self._request_in_progress or self._messages:
            # Bytes of a pipelined request arrived while an earlier one is being handled; judge
            # them once the connection is idle again.
            self._arm_header_timer()
            return
        if self._refused:
            self._refuse_when_headers_end(b"\r\n\r\n")
            return
        if self._partial:
            log.info("header_timeout", timeout_s=self._limits.header_timeout_s)
            self._limits.events.request_timed_out("headers")
            self._write_and_close(
                raw_error_response(
                    408,
                    f"request headers not received within {self._limits.header_timeout_s:g} s",
                    "request_timeout",
                )
            )
            return
        if self._request_count == 0:
            log.info("idle_connection_closed", timeout_s=self._limits.header_timeout_s)
            self._limits.events.request_timed_out("idle")
            self.force_close()

    def _arm_body_timer(self, payload: Any) -> None:
        self._cancel_body_timer()
        self._pending_body = payload
        self._body_timer = self._loop.call_later(self._limits.body_timeout_s, self._body_expired)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._pending_body = None

    def _body_expired(self) -> None:
        self._body_timer = None
        payload, self._pending_body = self._pending_body, None
        if payload is None or payload.is_eof() or self.transport is None:
            return
        self._timed_out = True
        log.info("body_timeout", timeout_s=self._limits.body_timeout_s)
        self._limits.events.request_timed_out("body")
        payload.set_exception(
            RequestTimeout(f"request body not received within {self._limits.body_timeout_s:g} s")
        )

    # -- writing ---------------------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(self._limits.write_timeout_s, self._write_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_expired(self) -> None:
        self._write_timer = None
        transport = self.transport
        if transport is not None and self.writing_paused:
            log.info("write_timeout", timeout_s=self._limits.write_timeout_s)
            self._limits.events.request_timed_out("write")
            transport.abort()

    # -- responses -------------------------------------------------------------------------------

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """Send the response; close at once if the request body was left unread or timed out.

        An ``HTTPException`` that escaped the application's middleware (aiohttp raises some before
        it, e.g. 417 for an unknown ``Expect``) is answered as a JSON error like every other one.
        """
        if isinstance(resp, web.HTTPException) and not resp.prepared:
            self._limits.events.request_rejected(rejected_label(resp.status))
            resp = translate(resp)
        result = await super().finish_response(request, resp, start_time)
        if self._timed_out or not request.content.is_eof():
            self._cancel_body_timer()
            self.force_close()
        return result

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse or hand over: a JSON error, then close."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send an error")
        code_status, code, text = classify_parse_error(exc, status)
        self._limits.events.request_rejected(rejected_label(code_status))
        if code_status >= 500:
            log.error("request_failed_outside_app", error=repr(exc))
        else:
            log.info("bad_http_request", status=code_status, code=code, error=str(exc or message))
        resp = web.Response(
            status=code_status,
            body=error_body(code_status, text, code),
            content_type="application/json",
        )
        resp.force_close()
        return resp


def throttle_reason(status: int, body: object) -> ThrottleReason | None:
    """Why a response refused its request with ``429``, from its JSON error code (pure).

    ``rate_limit_exceeded`` is the access policy's requests-per-minute (agent/server/guard.py);
    ``overloaded`` is a model's full queue (agent/engine/batching.py). Anything else is ``None``.
    """
    if status != 429 or not isinstance(body, bytes) or len(body) > 4096:
        return None
    try:
        error = json.loads(body).get("error")
        code = error.get("code") if isinstance(error, dict) else None
    except (ValueError, AttributeError):
        return None
    if code == "rate_limit_exceeded":
        return "rate_limit"
    if code == "overloaded":
        return "queue_full"
    return None


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_Middleware = Callable[[web.Request, _Handler], Awaitable[web.StreamResponse]]


def throttle_middleware(events: LimitEvents) -> _Middleware:
    """A middleware that reports every ``429`` the application answers to ``events``.

    It must sit outside the one that turns exceptions into JSON errors (the order is declared in
    :func:`agent.server.http.build_app`), so that it sees the final response; a ``429`` is only
    ever sent before a response starts, so the body is whole.
    """

    @web.middleware
    async def count_throttled(request: web.Request, handler: _Handler) -> web.StreamResponse:
        response = await handler(request)
        if response.status == 429 and isinstance(response, web.Response):
            reason = throttle_reason(response.status, response.body)
            if reason is not None:
                events.request_throttled(reason)
        return response

    return count_throttled


class GuardedSite(web.BaseSite):
    """Serve a runner's application on a listening socket through :class:`GuardedRequestHandler`."""

    __slots__ = ("_counter", "_limits", "_name", "_sock")

    def __init__(
        self, runner: web.BaseRunner, sock: socket.socket, limits: ServerLimits, *, backlog: int = 128
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._sock = sock
        self._limits = limits
        self._counter = ConnectionCounter(limits.max_connections, limits.events)
        try:
            where = sock.getsockname()
        except OSError:
            where = "?"
        self._name = f"http://unix:{where}:"

    @property
    def name(self) -> str:
        return self._name

    @property
    def counter(self) -> ConnectionCounter:
        return self._counter

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        if server is None:
            raise RuntimeError("runner.setup() must run before the site starts")
        kwargs = {"access_log": None, **self._limits.handler_kwargs()}

        def factory() -> GuardedRequestHandler:
            return GuardedRequestHandler(
                server, limits=self._limits, counter=self._counter, loop=loop, **kwargs
            )

        self._server = await loop.create_server(factory, sock=self._sock, backlog=self._backlog)


__all__ = [
    "REJECTED_STATUSES",
    "ConnectionCounter",
    "GuardedRequestHandler",
    "GuardedSite",
    "LimitEvents",
    "NoEvents",
    "RefusalReason",
    "RequestTimeout",
    "ServerLimits",
    "ThrottleReason",
    "TimeoutPhase",
    "classify_parse_error",
    "error_body",
    "throttle_middleware",
    "raw_error_response",
    "rejected_label",
    "throttle_reason",
]
