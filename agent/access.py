"""Role-based access: (subject, action, resource, policy) -> allow/deny with a reason. Pure.

Invariants:

- Deny by default. A subject is allowed an action only when a role bound to it (by uid, user
  name or any of its group names) holds a permission naming that action (or ``admin``) whose
  model patterns match the resource. No binding, no role, no match: denied.
- ``admin`` is the superuser permission: it grants every action on every resource.
- Model patterns are shell patterns matched case-sensitively (:func:`fnmatch.fnmatchcase`).
  A resource of ``None`` means "not about one model" (``status``, ``models.list``) or "on some
  model" (the coarse check before the model id is known): any pattern matches it.
- A denial names the missing permission (``infer on model 'x'``) and the roles that were tried.
- When several bound roles allow an action, the most generous limits among them apply
  (no limit beats a limit, a larger limit beats a smaller one).

Nothing here reads files, clocks or the user database: the caller builds the :class:`Subject`
and passes a clock to :class:`RateLimiter`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from registry.policy import Action

MODEL_SCOPED: frozenset[Action] = frozenset({Action.INFER, Action.EMBED, Action.MODELS_ADMIN})
"""Actions whose resource is a model id; the others ignore model patterns."""


@dataclass(frozen=True, slots=True)
class Subject:
    """Who asks. Local callers carry uid/gid/pid/user/groups; the hub carries a key id."""

    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    user: str | None = None
    groups: tuple[str, ...] = ()
    key_id: str | None = None

    def describe(self) -> str:
        if self.key_id is not None:
            return f"hub key {self.key_id}"
        name = self.user if self.user is not None else "?"
        uid = self.uid if self.uid is not None else "?"
        return f"user {name} (uid {uid})"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-role limits; ``None`` means unlimited."""

    max_tokens: int | None = None
    requests_per_minute: int | None = None

    @staticmethod
    def most_generous(items: Iterable[Limits]) -> Limits:
        seq = list(items)
        if not seq:
            return Limits()

        def best(values: list[int | None]) -> int | None:
            return None if any(v is None for v in values) else max(v for v in values if v is not None)

        return Limits(
            max_tokens=best([x.max_tokens for x in seq]),
            requests_per_minute=best([x.requests_per_minute for x in seq]),
        )


@dataclass(frozen=True, slots=True)
class Permission:
    actions: frozenset[Action]
    models: tuple[str, ...] = ("*",)

    def grants(self, action: Action, resource: str | None) -> bool:
        if Action.ADMIN in self.actions:
            return True
        if action not in self.actions:
            return False
        if action not in MODEL_SCOPED:
            return True
        if resource is None:
            # Administering no particular model (POST /admin/reload: everything) needs the grant on
            # every model; for infer/embed this is the coarse check before a model is known.
            return action is not Action.MODELS_ADMIN or "*" in self.models
        return any(fnmatchcase(resource, pattern) for pattern in self.models)


@dataclass(frozen=True, slots=True)
class Role:
    name: str
    permissions: tuple[Permission, ...] = ()
    limits: Limits = field(default_factory=Limits)

    def grants(self, action: Action, resource: str | None) -> bool:
        return any(p.grants(action, resource) for p in self.permissions)


@dataclass(frozen=True, slots=True)
class Binding:
    """Gives ``role`` to every subject matching one of the users, groups or uids."""

    role: str
    users: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()
    uids: frozenset[int] = frozenset()
    key_ids: frozenset[str] = frozenset()

    def matches(self, subject: Subject) -> bool:
        return (
            (subject.uid is not None and subject.uid in self.uids)
            or (subject.user is not None and subject.user in self.users)
            or any(g in self.groups for g in subject.groups)
            or (subject.key_id is not None and subject.key_id in self.key_ids)
        )


@dataclass(frozen=True, slots=True)
class Policy:
    """Roles and bindings. ``version`` only ever grows (0 is the local policy from config)."""

    roles: dict[str, Role]
    bindings: tuple[Binding, ...]
    version: int = 0
    source: str = "config"

    def roles_of(self, subject: Subject) -> list[Role]:
        names: list[str] = []
        for binding in self.bindings:
            if binding.role not in names and binding.matches(subject):
                names.append(binding.role)
        return [self.roles[n] for n in names if n in self.roles]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    action: Action
    resource: str | None
    roles: tuple[str, ...]
    """Every role bound to the subject (the audit log records them)."""
    reason: str
    limits: Limits = field(default_factory=Limits)

    @property
    def missing(self) -> str | None:
        """The permission that was missing, as the 403 message names it."""
        if self.allowed:
            return None
        return describe_permission(self.action, self.resource)


def describe_permission(action: Action, resource: str | None) -> str:
    if action in MODEL_SCOPED and resource is not None:
        return f"{action.value} on model {resource!r}"
    return action.value


def decide(subject: Subject, action: Action, resource: str | None, policy: Policy) -> Decision:
    """Allow or deny ``action`` on ``resource`` for ``subject`` under ``policy``."""
    roles = policy.roles_of(subject)
    names = tuple(r.name for r in roles)
    granting = [r for r in roles if r.grants(action, resource)]
    wanted = describe_permission(action, resource)
    if granting:
        via = ", ".join(r.name for r in granting)
        return Decision(
            True,
            action,
            resource,
            names,
            f"{wanted} granted by role {via}",
            Limits.most_generous(r.limits for r in granting),
        )
    if not roles:
        reason = f"permission {wanted!r} denied: no role is bound to {subject.describe()}"
    else:
        reason = f"permission {wanted!r} denied: not granted by role(s) {', '.join(names)}"
    return Decision(False, action, resource, names, reason)


def check_max_tokens(decision: Decision, requested: int) -> str | None:
    """``None`` when ``requested`` is within the role's limit, else the refusal message."""
    limit = decision.limits.max_tokens
    if limit is None or requested <= limit:
        return None
    return f"max_tokens {requested} exceeds the limit {limit} of role(s) {', '.join(decision.roles)}"


class RateLimiter:
    """Token buckets per key: ``rpm`` requests per minute, a burst of ``rpm``.

    ``hit`` returns 0.0 when the request may go ahead (and takes a token), else the seconds to
    wait. Idle buckets are forgotten once full again, so memory stays bounded by active callers.
    """

    def __init__(self, clock: Callable[[], float], max_keys: int = 10_000) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._max_keys = max_keys

    def hit(self, key: str, rpm: int) -> float:
        now = self._clock()
        rate = rpm / 60.0
        tokens, last = self._buckets.get(key, (float(rpm), now))
        tokens = min(float(rpm), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self._max_keys:
                self._forget_full(now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return math.ceil((1.0 - tokens) / rate * 1000) / 1000

    def _forget_full(self, now: float) -> None:
        # A bucket idle for a minute has refilled completely: forgetting it changes nothing.
        for key, (_, last) in list(self._buckets.items()):
            if now - last >= 60.0:
                del self._buckets[key]


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a refusal is recorded now; if so, how many of the same caller's refusals were
    suppressed before it (and since when); if not, when to try again."""

    record: bool
    suppressed: int = 0
    since: float | None = None
    retry_after: float = 0.0


class RefusalGate:
    """A per-caller budget for *recording* refusals (403 denied, 400/429 over a limit).

    Invariants: each caller (``key``, the peer's uid) gets ``per_minute`` recorded refusals per
    minute (a burst of as many); beyond that a refusal is not written but counted, and the count
    (with the time of the first one) rides on that caller's next recorded refusal, or comes out of
    :meth:`drain` when the agent stops. So a caller looping on a forbidden route costs no fsync per
    request, and what it did is still on record, counted. Memory: at most ``max_keys`` callers are
    tracked; beyond that their counts fold into the key ``"*"``.
    """

    def __init__(self, clock: Callable[[], float], per_minute: int = 30, max_keys: int = 10_000) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._limiter = RateLimiter(clock, max_keys)
        self._suppressed: dict[str, tuple[int, float]] = {}
        self._max_keys = max_keys

    def admit(self, key: str) -> Admission:
        wait = self._limiter.hit(key, self.per_minute)
        if wait > 0:
            if key not in self._suppressed and len(self._suppressed) >= self._max_keys:
                key = "*"
            count, since = self._suppressed.get(key, (0, self._clock()))
            self._suppressed[key] = (count + 1, since)
            return Admission(False, retry_after=wait)
        count, since = self._suppressed.pop(key, (0, 0.0))
        return Admission(True, count, since if count else None)

    def drain(self) -> dict[str, tuple[int, float]]:
        """Counts not yet recorded, by caller: ``{key: (count, since)}``; forgets them."""
        out, self._suppressed = self._suppressed, {}
        return out


__all__ = [
    "MODEL_SCOPED",
    "Admission",
    "Action",
    "Binding",
    "Decision",
    "Limits",
    "Permission",
    "Policy",
    "RateLimiter",
    "RefusalGate",
    "Role",
    "Subject",
    "check_max_tokens",
    "decide",
    "describe_permission",
]
