"""The HTTP guard: authorize every request by the caller's Unix identity, and audit it.

Runs as an aiohttp middleware inside ``request_context`` (which supplies ``request[PEER_KEY]`` and
translates the errors raised here into OpenAI-shaped responses).

Invariants:

- Deny by default: a route not in :data:`ROUTE_ACTIONS` needs ``admin``; a caller without peer
  credentials (not a Unix socket) has no uid, user or group, so no binding matches it.
- Model-scoped actions are decided on the model the request names (``model`` in the JSON body,
  else the pool's default), before the handler runs; a denial is a 403 naming the missing
  permission, and it is recorded durably before the 403 is sent.
- Role limits: a token budget beyond the role's limit is a 400 naming the limit. The budget is
  read from the body validated by the route's own model (``max_completion_tokens`` counts for chat
  only, as the handler reads it), and the handler generates with that same validated object;
  ``requests_per_minute`` beyond the role's budget is a 429 with ``Retry-After``. Both recorded.
- Durable before acknowledged: for an audited request the record is committed before the
  response is released to aiohttp (which sends a plain body, or the end of a chunked stream, only
  after this middleware returns); a stream writes it even before its ``data: [DONE]`` event
  (:func:`agent.server.usage.record_before_done`). If the record cannot be written, a plain
  response becomes a 503 and a stream ends with an error event, or is cut off without its final
  chunk, so the client never sees a completed request that has no record.
- :data:`PUBLIC` routes (``/health``) are neither authorized nor audited: a liveness probe.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import pwd
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agent.access import (
    Action,
    Decision,
    Policy,
    RateLimiter,
    RefusalGate,
    Subject,
    check_max_tokens,
    decide,
)
from agent.audit.store import AuditFull, AuditLog, AuditUnavailable
from agent.config import Settings
from agent.engine.pool import ModelPool
from agent.errors import (
    BadRequest,
    ConfigError,
    Forbidden,
    ModelNotReady,
    Overloaded,
    PayloadTooLarge,
    RequestError,
)
from agent.policy import PolicyHolder
from agent.server import schemas
from agent.server.common import read_json
from agent.server.keys import LIMITS_KEY, PARSED_BODY_KEY, PEER_KEY, POOL_KEY, REQUEST_ID_KEY
from agent.server.usage import FINISH_KEY, STREAM_AUDIT_KEY, Finisher, StreamAudit, note_usage, noted_usage
from fleet.chain import Entry, iso_time
from fleet.log import get_logger

log = get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC: frozenset[tuple[str, str]] = frozenset({("GET", "/health")})
ROUTE_ACTIONS: dict[tuple[str, str], Action] = {
    ("POST", "/v1/completions"): Action.INFER,
    ("POST", "/v1/chat/completions"): Action.INFER,
    ("POST", "/v1/embeddings"): Action.EMBED,
    ("POST", "/tokenize"): Action.INFER,
    ("POST", "/detokenize"): Action.INFER,
    ("GET", "/v1/models"): Action.MODELS_LIST,
    ("GET", "/admin/status"): Action.STATUS,
    ("GET", "/metrics"): Action.STATUS,
    ("GET", "/admin/audit"): Action.AUDIT_READ,
    ("GET", "/openapi.json"): Action.STATUS,
}
PREFIX_ACTIONS: tuple[tuple[str, str, Action], ...] = (
    ("GET", "/v1/models/", Action.MODELS_LIST),
    ("POST", "/admin/models", Action.MODELS_ADMIN),
    ("POST", "/admin/select", Action.MODELS_ADMIN),
    ("POST", "/admin/pin", Action.MODELS_ADMIN),
    ("POST", "/admin/reload", Action.MODELS_ADMIN),
)
READS = frozenset({Action.MODELS_LIST, Action.STATUS})
"""Allowed reads are audited only with ``[audit] audit_reads``; their denials always are."""
_MAX_USAGE_BODY = 256 << 10


def action_for(method: str, path: str) -> Action | None:
    """The action a route needs; ``None`` for public routes; ``admin`` for anything unknown."""
    if (method, path) in PUBLIC:
        return None
    found = ROUTE_ACTIONS.get((method, path))
    if found is not None:
        return found
    for m, prefix, action in PREFIX_ACTIONS:
        if method == m and path.startswith(prefix):
            return action
    return Action.ADMIN


@dataclass
class Guard:
    """What the middleware needs; stored on the application under :data:`GUARD_KEY`."""

    audit: AuditLog
    policies: PolicyHolder
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(time.monotonic))
    refusals: RefusalGate = field(default_factory=lambda: RefusalGate(time.time))
    audit_reads: bool = False
    identity_ttl_s: float = 30.0
    _identities: dict[tuple[int, int], tuple[float, str, tuple[str, ...]]] = field(default_factory=dict)

    def close(self) -> None:
        """Record the refusals still counted but unwritten (one record per caller), flush the
        audit log (final checkpoint) and stop its writer."""
        for key, (count, since) in self.refusals.drain().items():
            self.audit.submit(
                Entry(
                    "access.refusals",
                    None,
                    "denied",
                    f"{count} refused request(s) over the caller's recording budget",
                    {"caller": key},
                    {"suppressed": count, "suppressed_since": iso_time(since)},
                ),
                shed=True,
            )
        self.audit.close()

    def subject(self, peer: Any) -> Subject:
        """The :class:`Subject` of a peer (uid, gid, pid), names resolved and cached briefly."""
        if peer is None:
            return Subject()
        key = (peer.uid, peer.gid)
        now = time.monotonic()
        cached = self._identities.get(key)
        if cached is None or cached[0] < now:
            if len(self._identities) > 4096:
                self._identities.clear()
            cached = (now + self.identity_ttl_s, *_resolve(peer.uid, peer.gid))
            self._identities[key] = cached
        return Subject(uid=peer.uid, gid=peer.gid, pid=peer.pid, user=cached[1], groups=cached[2])


GUARD_KEY: web.AppKey[Guard] = web.AppKey("guard", Guard)

_POOL_EVENTS = {
    "loaded": ("models.load", "ok"),
    "unloaded": ("models.unload", "ok"),
    "swapped": ("models.switch", "ok"),
    "swap_failed": ("models.switch", "failed"),
}


def _caller_key(subject: Subject) -> str:
    """Whose refusal budget a request draws on: its uid (every process of a user shares one)."""
    return f"uid:{subject.uid}" if subject.uid is not None else "uid:unknown"


def _resolve(uid: int, gid: int) -> tuple[str, tuple[str, ...]]:
    """The user name (the uid as text when unknown) and the names of its groups, ``gid``'s first."""
    gids = [gid]
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    else:
        with suppress(OSError):
            gids = os.getgrouplist(user, gid)
    names: list[str] = []
    for g in [gid, *gids]:
        try:
            name = grp.getgrgid(g).gr_name
        except KeyError:
            name = str(g)
        if name not in names:
            names.append(name)
    return user, tuple(names)


def actor_of(subject: Subject, decision: Decision) -> dict[str, Any]:
    return {
        "uid": subject.uid,
        "gid": subject.gid,
        "pid": subject.pid,
        "user": subject.user,
        "role": ",".join(decision.roles) or None,
    }


async def _peek_json(request: web.Request) -> tuple[dict[str, Any] | None, RequestError | None]:
    """The JSON object body (parsed once and kept for the handler), or the size error reading it gives.

    A body that is not JSON is left for the handler to name: the guard then sees no model.
    """
    try:
        data = await read_json(request)
    except PayloadTooLarge as exc:
        return None, exc
    except RequestError:
        return None, None
    return (data if isinstance(data, dict) else None), None


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, ModelNotReady):
        return 503
    if isinstance(exc, web.HTTPException):
        return exc.status
    return 500


def _usage_from(response: web.StreamResponse) -> dict[str, Any]:
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return {}
    body = response.body
    if not isinstance(body, bytes) or len(body) > _MAX_USAGE_BODY:
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        if isinstance(data.get("model"), str):
            out["model"] = data["model"]
        usage = data.get("usage")
        if isinstance(usage, dict):
            for k in ("prompt_tokens", "completion_tokens"):
                if isinstance(usage.get(k), int):
                    out[k] = usage[k]
    return out


def _token_budget(request: web.Request, body: dict[str, Any], default: int) -> int | None:
    """The generation's token budget as the handler will read it: the body is validated with the
    route's own model and kept (``PARSED_BODY_KEY``) for the handler, which generates with exactly
    this object. None when the body does not validate (the handler then answers 400 naming why)."""
    model = schemas.generation_body(request.path)
    if model is None:
        return default
    try:
        parsed: schemas.GenerationBody = schemas.parse_body(model, body)
    except RequestError:
        return None
    request[PARSED_BODY_KEY] = parsed
    return parsed.token_budget(default)


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authorize, enforce role limits, run the handler, and record the outcome durably."""
    guard = request.app.get(GUARD_KEY)
    action = action_for(request.method, request.path)
    if guard is None or action is None:
        return await handler(request)
    started = time.monotonic()
    subject = guard.subject(request.get(PEER_KEY))
    details: dict[str, Any] = {
        "request_id": request.get(REQUEST_ID_KEY),
        "route": f"{request.method} {request.path}",
    }
    body: dict[str, Any] | None = None
    body_error: RequestError | None = None
    resource: str | None = None
    if action in (Action.INFER, Action.EMBED) or (action is Action.MODELS_ADMIN and request.method == "POST"):
        body, body_error = await _peek_json(request)
        named = body.get("model") if body is not None else None
        if isinstance(named, str) and named:
            resource = named
        elif action is not Action.MODELS_ADMIN:  # the model the request will really go to
            pool = request.app[POOL_KEY]
            chat = request.path == "/v1/chat/completions"
            resource = pool.default_for("chat") if chat else pool.default_id
    decision = decide(subject, action, resource, guard.policies.current())
    actor = actor_of(subject, decision)

    async def record(outcome: str, reason: str, *, shed: bool = False, **extra: Any) -> None:
        entry = Entry(
            action.value,
            resource,
            outcome,
            reason,
            actor,
            {**details, **extra, "latency_ms": round((time.monotonic() - started) * 1000, 3)},
        )
        await guard.audit.append(entry, shed=shed)

    async def refuse(outcome: str, reason: str, status: int) -> None:
        """Record a refusal within the caller's budget (:class:`RefusalGate`), as a record the log
        may shed when it is half full; over the budget nothing is written (it is counted onto the
        caller's next recorded refusal) and the answer is a 429."""
        admission = guard.refusals.admit(_caller_key(subject))
        if not admission.record:
            throttled = Overloaded(
                f"too many refused requests; retry after {admission.retry_after:.1f} s",
                retry_after=admission.retry_after,
                status=429,
            )
            throttled.code = "refusals_throttled"
            raise throttled
        extra: dict[str, Any] = {"status": status}
        if admission.suppressed and admission.since is not None:
            extra.update(suppressed=admission.suppressed, suppressed_since=iso_time(admission.since))
        await record(outcome, reason, shed=True, **extra)

    if not decision.allowed:
        await refuse("denied", decision.reason, 403)
        raise Forbidden(decision.reason)
    audited = guard.audit_reads or action not in READS
    if action is Action.INFER and body is not None:  # no body: the handler names what is wrong with it
        default = request.app[LIMITS_KEY].get("default_max_tokens", 256)
        budget = _token_budget(request, body, default)
        problem = check_max_tokens(decision, budget) if budget is not None else None
        if problem is not None:
            await refuse("refused", problem, 400)
            raise BadRequest(problem, param="max_tokens", code="max_tokens_limit")
    rpm = decision.limits.requests_per_minute
    if rpm is not None:
        wait = guard.limiter.hit(f"{subject.uid}/{','.join(decision.roles)}", rpm)
        if wait > 0:
            reason = f"rate limit of {rpm} requests per minute for role(s) {','.join(decision.roles)}"
            await refuse("refused", reason, 429)
            refusal = Overloaded(f"{reason} reached; retry after {wait:.1f} s", retry_after=wait, status=429)
            refusal.code = "rate_limit_exceeded"  # OpenAI's code; a full queue stays "overloaded"
            raise refusal
    recorded = False

    async def finish() -> None:  # a stream, right before its final event
        nonlocal recorded
        if not recorded:
            await record("ok", decision.reason, **noted_usage(request), status=200)
            recorded = True

    async def stream_started() -> None:  # a stream: durable before its first byte
        await record("started", decision.reason, status=200, stream=True)

    if audited:
        guard.audit.admit()
        request[FINISH_KEY] = Finisher(finish)
        request[STREAM_AUDIT_KEY] = StreamAudit(stream_started, guard.audit.check_writable)
    try:
        if body_error is not None:
            raise body_error
        response = await handler(request)
    except asyncio.CancelledError:
        if audited and not recorded:  # the client went away: still recorded, without waiting
            guard.audit.submit(
                Entry(
                    action.value,
                    resource,
                    "cancelled",
                    "client disconnected",
                    actor,
                    {**details, "status": 499},
                )
            )
        raise
    except Exception as exc:
        if audited and not recorded:
            await record("error", str(exc)[:300] or type(exc).__name__, status=_status_of(exc))
        raise
    if not audited or recorded:
        return response
    extra = {**_usage_from(response), **noted_usage(request), "status": response.status}
    outcome = "ok" if response.status < 400 else "error"
    try:
        await record(outcome, decision.reason if outcome == "ok" else f"HTTP {response.status}", **extra)
    except (AuditFull, AuditUnavailable):
        if not response.prepared:
            raise  # the client gets the 503 instead of the result
        if request.transport is not None:
            request.transport.close()  # no final chunk: the client cannot take this as completed
    return response


def open_guard(settings: Settings, pool: ModelPool) -> Guard:
    """Open the audit log (device key, writer thread) and load the policy; the application built with
    this guard (:func:`agent.server.http.build_app`) authorizes and audits every request.

    Records the configuration loaded at start and, from then on, the pool's model events. A bad local
    policy raises :class:`ConfigError`. Call ``guard.close()`` after the server (and the pool) stopped.
    """
    import hashlib

    from agent.audit.store import agent_actor, open_log
    from agent.policy import PolicyError, local_policy
    from fleet.device_key import ensure_device_key

    try:
        policy = local_policy(settings)
    except PolicyError as exc:
        raise ConfigError(f"config error: access: {exc}") from None
    key = ensure_device_key(settings.state_dir)
    audit = open_log(settings)
    audit.start()
    holder = PolicyHolder(policy, settings.state_dir)

    def changed(old: Policy, new: Policy) -> None:
        log.info("policy_in_force", source=new.source, version=new.version)
        audit.submit(
            Entry(
                "policy.load",
                new.source,
                "ok",
                f"policy v{new.version} in force",
                agent_actor(),
                {"previous": old.source, "previous_version": old.version, "version": new.version},
            )
        )

    in_force = holder.current()
    holder.on_change = changed
    digest = hashlib.sha256(settings.model_dump_json().encode()).hexdigest()
    audit.submit(
        Entry(
            "config.load",
            None,
            "ok",
            "agent started",
            agent_actor(),
            {
                "config_sha256": digest,
                "state_dir": str(settings.state_dir),
                "policy": in_force.source,
                "policy_version": in_force.version,
                "device_key": key.key_id,
                "audit_on_full": settings.audit.on_full,
            },
        )
    ).result()

    def pool_event(event: str, model_id: str) -> None:
        action, outcome = _POOL_EVENTS.get(event, (f"models.{event}", "ok"))
        audit.submit(
            Entry(action, model_id, outcome, f"model {model_id} {event}", agent_actor(), {"event": event})
        )

    pool.add_listener(pool_event)  # loads, unloads and switches of the served model
    return Guard(
        audit,
        holder,
        refusals=RefusalGate(time.time, settings.audit.refusals_per_minute),
        audit_reads=settings.audit.audit_reads,
    )


__all__ = [
    "GUARD_KEY",
    "PREFIX_ACTIONS",
    "PUBLIC",
    "READS",
    "ROUTE_ACTIONS",
    "Guard",
    "action_for",
    "actor_of",
    "guard_middleware",
    "open_guard",
    "note_usage",
]
