"""Reload without restart: re-read the config the daemon started with and apply what can change live.

Triggers: ``SIGHUP`` (``systemctl reload edge-agent``) and ``POST /admin/reload``. A reload
re-reads the same source the daemon started with (:class:`ConfigSource`: the ``--config`` file,
else ``$EDGE_AGENT_CONFIG``, else ``/etc/edge-agent/config.toml``; the environment; a
``--state-dir`` override), computes what changed as dotted keys (``pool.pinned``,
``access.bindings`` ...), and applies the keys of :data:`LIVE_KEYS`:

- ``[access]``: the local policy is replaced (a newer hub policy still wins, as at start-up);
- ``[log]`` level and format;
- ``[pool]`` pins, ``keep_alive_s``, ``max_loaded``, ``memory_budget_mb`` (a smaller budget or
  count unloads idle, unpinned models other than the default until the rest fit; busy, pinned and
  default models stay, and the limits then hold from the next load on);
- ``[audit] audit_reads``;

and re-reads the verified store: models newly installed under ``<state_dir>/registry`` (re-hashed
now) are registered in the pool (loadable on demand), models gone from the store are removed
(requests in flight finish; the default model is never removed: it is logged and kept). When fleet
sync runs (``[hub] host`` set in the running settings), the store's models are sync's (it owns
activations, smoke tests, rollbacks and removals): the reload leaves them alone and reports the
store as ``managed by sync``.

Invariants:

- All or nothing on validation: the new file and its local policy are parsed in full before
  anything is applied. A bad config is refused with its one-line :class:`ConfigError` message,
  logged and audited, and the running settings stay.
- Never half-applied: a changed key outside :data:`LIVE_KEYS` (``engine.*``, ``server.*``,
  ``hub.*``, ``state_dir`` ...) is reported in ``restart_needed`` and not applied at all; the
  running settings afterwards are the old ones with only the live keys taken from the new file,
  so the next reload reports the same keys again until the daemon restarts.
- A failure while re-reading the store (after the live keys were applied) does not undo the
  bookkeeping: the running settings take the applied keys, the report lists them and carries the
  store error separately (outcome ``partial``, ``store: "failed"``). Any other unexpected failure
  is outcome ``failed`` (``internal``), never ``refused``: ``refused`` means a bad config only.
- Reloads are serialised; each one writes exactly one ``config.reload`` audit record (outcome
  ``ok``, ``partial``, ``refused`` or ``failed``, changed keys); a changed local policy also writes
  ``policy.change``.
- A new version of a served model is registered only after its old entry was removed: an entry
  whose removal failed (or that was gone already) is reported as kept, so a loaded engine is never
  overwritten (and never leaks out of the memory budget).
- sd_notify: ``RELOADING=1`` (with ``MONOTONIC_USEC=``) before, ``READY=1`` after, whatever the
  outcome.

The rules (:func:`diff_settings`, :func:`plan_reload`, :func:`plan_store`, :func:`plan_register`,
:func:`store_mode`, :func:`plan_pins`, :func:`effective_settings`) are pure; :class:`Reloader` does the I/O.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from agent.config import PoolSettings, Settings, load_settings
from agent.engine.base import ModelInfo
from agent.errors import ConfigError, EngineError, ModelLoadError, ModelNotReady
from fleet import log as fleet_log
from fleet.log import get_logger

if TYPE_CHECKING:
    from agent.access import Policy
    from agent.daemon.sdnotify import ServiceNotifier
    from agent.engine.pool import ModelPool
    from agent.server.guard import Guard

log = get_logger(__name__)

LIVE_KEYS: frozenset[str] = frozenset(
    {
        "access.policy_file",
        "access.roles",
        "access.bindings",
        "log.level",
        "log.format",
        "pool.pinned",
        "pool.keep_alive_s",
        "pool.max_loaded",
        "pool.memory_budget_mb",
        "audit.audit_reads",
    }
)
"""Dotted keys a reload applies to the running daemon; any other changed key needs a restart."""


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the daemon's settings came from: what ``edge-agent run`` was given."""

    config: Path | None = None
    """``--config``; ``None``: ``$EDGE_AGENT_CONFIG``, else the system file if it exists."""
    state_dir: Path | None = None
    """``--state-dir``, which overrides the file and the environment."""

    def load(self) -> Settings:
        """The settings as ``edge-agent run`` would build them now; raises :class:`ConfigError`."""
        settings = load_settings(self.config)
        if self.state_dir is not None:
            settings = settings.model_copy(update={"state_dir": self.state_dir})
        return settings


# -- pure rules -----------------------------------------------------------------------------------


def _flat(settings: Settings) -> dict[str, Any]:
    """``section.field`` (or a top-level ``field``) -> its JSON value."""
    dumped = settings.model_dump(mode="json")
    out: dict[str, Any] = {}
    for name, value in dumped.items():
        if isinstance(getattr(settings, name), BaseModel) and isinstance(value, dict):
            for key, inner in value.items():
                out[f"{name}.{key}"] = inner
        else:
            out[name] = value
    return out


def diff_settings(old: Settings, new: Settings) -> tuple[str, ...]:
    """The dotted keys whose values differ between ``old`` and ``new``, sorted."""
    a, b = _flat(old), _flat(new)
    return tuple(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    changed: tuple[str, ...]
    live: tuple[str, ...]
    """Changed keys applied to the running daemon."""
    restart_needed: tuple[str, ...]
    """Changed keys left as they run until a restart."""


def plan_reload(old: Settings, new: Settings) -> ReloadPlan:
    """Split what changed into keys applied live and keys that need a restart."""
    changed = diff_settings(old, new)
    return ReloadPlan(
        changed,
        tuple(k for k in changed if k in LIVE_KEYS),
        tuple(k for k in changed if k not in LIVE_KEYS),
    )


def effective_settings(running: Settings, new: Settings, keys: Iterable[str]) -> Settings:
    """``running`` with the values of ``keys`` (dotted, :data:`LIVE_KEYS`) taken from ``new``."""
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key in keys:
        section, dot, name = key.partition(".")
        if dot:
            sections.setdefault(section, {})[name] = getattr(getattr(new, section), name)
        else:
            top[section] = getattr(new, section)
    update = {s: getattr(running, s).model_copy(update=f) for s, f in sections.items()}
    return running.model_copy(update={**top, **update})


@dataclass(frozen=True, slots=True)
class StorePlan:
    add: tuple[ModelInfo, ...] = ()
    """Installed in the store and not served yet (or a new version of a non-default model)."""
    remove: tuple[str, ...] = ()
    """Served from the store and gone from it (or replaced by a new version)."""
    kept: tuple[str, ...] = ()
    """The default model, gone from the store or replaced there: still served (select another)."""


def plan_store(
    served: Mapping[str, Path], store: Sequence[ModelInfo], store_dir: Path, default_id: str | None
) -> StorePlan:
    """What to register and remove so the pool serves the store's verified models.

    ``served`` maps the pool's model ids to their files; only those under ``store_dir`` came from
    the store (a ``[model] path`` or ``[embedding] path`` model is never touched). A model whose
    id is served but whose file differs is a new version: replaced unless it is the default.
    """
    in_store = {info.id: info for info in store}
    add = [info for info in store if info.id not in served]
    remove: list[str] = []
    kept: list[str] = []
    for model_id in sorted(served):
        if served[model_id].parent != store_dir:
            continue
        now = in_store.get(model_id)
        if now is not None and now.path == served[model_id]:
            continue
        if model_id == default_id:
            kept.append(model_id)
            continue
        remove.append(model_id)
        if now is not None:
            add.append(now)
    return StorePlan(tuple(add), tuple(remove), tuple(kept))


def plan_register(plan: StorePlan, removed: Iterable[str]) -> tuple[tuple[ModelInfo, ...], tuple[str, ...]]:
    """``(register, kept)``: the models of ``plan.add`` that may be registered now that the ids in
    ``removed`` were removed from the pool, and the replaced ids whose old entry stays.

    A new version (its id in ``plan.remove``) is registered only if its old entry was removed;
    otherwise registering would overwrite an entry that may hold a loaded engine.
    """
    done = set(removed)
    replacing = set(plan.remove)
    register = tuple(i for i in plan.add if i.id not in replacing or i.id in done)
    kept = tuple(i.id for i in plan.add if i.id in replacing and i.id not in done)
    return register, kept


STORE_RELOADED = "reloaded"
STORE_MANAGED_BY_SYNC = "managed by sync"
STORE_NOT_USED = "not used"
STORE_FAILED = "failed"


def store_mode(running: Settings) -> str:
    """Whether a reload re-reads the store: :data:`STORE_MANAGED_BY_SYNC` when the daemon runs fleet
    sync (``[hub] host`` in the *running* settings; ``hub.*`` only changes with a restart), else
    :data:`STORE_RELOADED`."""
    return STORE_MANAGED_BY_SYNC if running.hub.host is not None else STORE_RELOADED


def plan_pins(old: Sequence[str], new: Sequence[str], served: Iterable[str]) -> dict[str, bool]:
    """``model id -> pinned`` for the served models whose pin ``[pool] pinned`` added or dropped."""
    known = set(served)
    before, after = set(old), set(new)
    return {m: m in after for m in sorted(before ^ after) if m in known}


# -- the report -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReloadReport:
    """What one reload did (the JSON of ``POST /admin/reload``)."""

    trigger: str
    error: str | None = None
    """The one-line config error when the new config was refused (nothing applied), or with
    ``internal`` the unexpected failure that stopped the reload."""
    internal: bool = False
    """``error`` is not a config error but a failure of the agent (outcome ``failed``)."""
    changed: tuple[str, ...] = ()
    applied: tuple[str, ...] = ()
    restart_needed: tuple[str, ...] = ()
    models_added: tuple[str, ...] = ()
    models_removed: tuple[str, ...] = ()
    models_kept: tuple[str, ...] = ()
    store: str = STORE_RELOADED
    """:data:`STORE_RELOADED`, :data:`STORE_MANAGED_BY_SYNC` (left to sync), :data:`STORE_NOT_USED`
    or :data:`STORE_FAILED` (see ``store_error``)."""
    store_error: str | None = None
    """Why re-reading the store failed; the live keys were applied all the same (outcome ``partial``)."""
    policy_changed: bool = False
    policy_source: str | None = None
    policy_version: int | None = None
    duration_ms: float = 0.0

    @property
    def outcome(self) -> str:
        """``refused`` (bad config), ``failed`` (internal), ``partial`` (store failed) or ``ok``."""
        if self.error is not None:
            return "failed" if self.internal else "refused"
        return "partial" if self.store_error is not None else "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "trigger": self.trigger,
            "error": self.error,
            "changed": list(self.changed),
            "applied": list(self.applied),
            "restart_needed": list(self.restart_needed),
            "models_added": list(self.models_added),
            "models_removed": list(self.models_removed),
            "models_kept": list(self.models_kept),
            "store": self.store,
            "store_error": self.store_error,
            "policy": {
                "changed": self.policy_changed,
                "source": self.policy_source,
                "version": self.policy_version,
            },
            "duration_ms": self.duration_ms,
        }

    def summary(self) -> str:
        """One line for ``STATUS=`` and the journal."""
        if self.error is not None:
            return f"reload {self.outcome}: {self.error}"
        text = f"reloaded: {len(self.applied)} applied"
        if self.models_added or self.models_removed:
            text += f", models +{len(self.models_added)} -{len(self.models_removed)}"
        if self.store == STORE_MANAGED_BY_SYNC:
            text += ", store managed by sync"
        if self.restart_needed:
            text += f"; restart needed for: {', '.join(self.restart_needed)}"
        if self.store_error is not None:
            text += f"; model store not re-read: {self.store_error}"
        return text


# -- the I/O shell --------------------------------------------------------------------------------


def _same_policy(a: Policy, b: Policy) -> bool:
    from agent.policy import policy_to_dict

    return a.source == b.source and policy_to_dict(a) == policy_to_dict(b)


def _default_budget(pool: PoolSettings) -> int:
    from agent.engine.pool import pool_options

    budget: int = pool_options(pool)["memory_budget"]
    return budget


@dataclass
class _StoreSteps:
    """What the store step did so far (filled in as it goes)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


@dataclass
class Reloader:
    """Reloads the running daemon's settings (module docstring). Use from the event loop only."""

    source: ConfigSource
    settings: Settings
    """The settings in force (the start-up ones with the live keys of each reload applied)."""
    pool: ModelPool
    guard: Guard | None = None
    notifier: ServiceNotifier | None = None
    """Set once the daemon has sent READY=1."""
    budget_for: Callable[[PoolSettings], int] = _default_budget
    """The pool's memory budget for ``[pool]`` settings (the cgroup limit when none is set)."""
    reloads: int = 0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: set[asyncio.Task[ReloadReport]] = field(default_factory=set)

    def trigger(self, reason: str) -> None:
        """Start a reload in the background (a signal handler's entry point)."""
        task = asyncio.get_running_loop().create_task(self.reload(reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Wait for a reload in progress (shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def reload(self, trigger: str) -> ReloadReport:
        """Re-read the config and apply it; never raises for a bad config (see the report)."""
        async with self._lock:
            started = time.monotonic()
            if self.notifier is not None:
                self.notifier.reloading()
            try:
                report = await self._reload(trigger, started)
            except Exception as exc:  # a bug must not take the daemon down: report and keep serving
                log.exception("reload_failed", trigger=trigger)
                report = ReloadReport(
                    trigger, error=f"reload failed: {type(exc).__name__}: {exc}", internal=True
                )
            self.reloads += 1
            await self._audit(report)
            if report.error is not None:
                event = "reload_failed" if report.internal else "reload_refused"
                log.error(event, trigger=trigger, error=report.error)
            else:
                (log.error if report.store_error is not None else log.info)(
                    "reloaded",
                    trigger=trigger,
                    changed=list(report.changed),
                    applied=list(report.applied),
                    restart_needed=list(report.restart_needed),
                    models_added=list(report.models_added),
                    models_removed=list(report.models_removed),
                    store=report.store,
                    store_error=report.store_error,
                    duration_ms=report.duration_ms,
                )
            if self.notifier is not None:
                self.notifier.reloaded(report.summary())
            return report

    async def _reload(self, trigger: str, started: float) -> ReloadReport:
        from agent.policy import PolicyError, local_policy

        try:
            new = await asyncio.to_thread(self.source.load)
            policy = await asyncio.to_thread(local_policy, new)
        except ConfigError as exc:
            return ReloadReport(trigger, error=str(exc))
        except PolicyError as exc:
            return ReloadReport(trigger, error=f"config error: access: {exc}")
        old = self.settings
        plan = plan_reload(old, new)
        live = set(plan.live)
        if live & {"log.level", "log.format"}:
            fleet_log.configure(new.log.level, new.log.format)
        self._apply_pool(old, new, live)
        if "audit.audit_reads" in live and self.guard is not None:
            self.guard.audit_reads = new.audit.audit_reads
        policy_changed = await self._apply_policy(policy)
        store = store_mode(old)
        steps = _StoreSteps()
        store_error: str | None = None
        if store == STORE_RELOADED:
            try:
                store = await self._sync_store(new, steps)
            except Exception as exc:  # the live keys stay applied: report the store apart
                log.exception("reload_store_failed", trigger=trigger)
                store, store_error = STORE_FAILED, f"{type(exc).__name__}: {exc}"
        added, removed, kept = tuple(steps.added), tuple(steps.removed), tuple(sorted(set(steps.kept)))
        if added or "pool.pinned" in live:
            try:
                self.pool.start_loading()  # the default of a pool that had none, newly pinned models
            except (ModelNotReady, ModelLoadError) as exc:  # a cold swap in progress: loaded on demand
                log.warning("reload_load_deferred", reason=str(exc))
        self.settings = effective_settings(old, new, plan.live)
        current = self.guard.policies.current() if self.guard is not None else None
        return ReloadReport(
            trigger,
            changed=plan.changed,
            applied=plan.live,
            restart_needed=plan.restart_needed,
            models_added=added,
            models_removed=removed,
            models_kept=kept,
            store=store,
            store_error=store_error,
            policy_changed=policy_changed,
            policy_source=current.source if current is not None else None,
            policy_version=current.version if current is not None else None,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    def _apply_pool(self, old: Settings, new: Settings, live: set[str]) -> None:
        pool = self.pool
        if "pool.keep_alive_s" in live:
            pool.keep_alive_s = new.pool.keep_alive_s
        if "pool.max_loaded" in live:
            pool.max_loaded = new.pool.max_loaded
        if "pool.memory_budget_mb" in live:
            pool.memory_budget = self.budget_for(new.pool)
        if "pool.pinned" in live:
            served = [row.id for row in pool.status() if row.state != "retiring"]
            for model_id, pinned in plan_pins(old.pool.pinned, new.pool.pinned, served).items():
                pool.pin(model_id, pinned)
            missing = sorted(set(new.pool.pinned) - set(served))
            if missing:
                log.warning("pinned_model_not_served", models=missing)
        if {"pool.max_loaded", "pool.memory_budget_mb"} & live:  # after the pins: those stay
            evicted = pool.fit_limits()
            if evicted:
                log.info("models_evicted_by_reload", models=evicted)

    async def _apply_policy(self, policy: Policy) -> bool:
        """Make ``policy`` the local policy if it differs; audited as a policy change."""
        if self.guard is None:
            return False
        holder = self.guard.policies
        previous = holder.local
        if _same_policy(previous, policy):
            return False
        in_force = holder.replace_local(policy)
        from agent.audit.store import agent_actor
        from fleet.chain import Entry

        details = {"previous_source": previous.source, "in_force": in_force, "version": policy.version}
        await self._append(
            Entry("policy.change", policy.source, "ok", "local policy reloaded", agent_actor(), details)
        )
        return True

    async def _sync_store(self, new: Settings, steps: _StoreSteps) -> str:
        """Register newly installed store models, remove the ones gone; each step is recorded in
        ``steps`` as it is done (so a failure half-way still reports what changed)."""
        registry = new.state_dir / "registry"
        if new.model.path is not None or not registry.is_dir():
            return STORE_NOT_USED
        from agent.daemon.catalog import discover_store
        from registry.device import DeviceRegistry

        store = await asyncio.to_thread(discover_store, new)  # re-hashes every installed model
        store_dir = DeviceRegistry(new.state_dir).store.dir
        served = {row.id: Path(row.path) for row in self.pool.status() if row.state != "retiring"}
        plan = plan_store(served, store, store_dir, self.pool.default_id)
        removed = steps.removed
        for model_id in plan.remove:
            try:
                gone = await self.pool.remove(model_id)
            except EngineError as exc:  # became the default meanwhile
                log.warning("model_kept", model=model_id, reason=str(exc))
                steps.kept.append(model_id)
                continue
            if gone:
                removed.append(model_id)
            else:
                log.warning("model_kept", model=model_id, reason="no longer served")
                steps.kept.append(model_id)
        register, not_replaced = plan_register(plan, removed)
        steps.kept.extend(not_replaced)
        for info in register:
            self.pool.register(info, pinned=info.id in new.pool.pinned)
            steps.added.append(info.id)
        for model_id in plan.kept:
            log.warning(
                "model_kept",
                model=model_id,
                reason="the default model changed or left the store; select another model first",
            )
            steps.kept.append(model_id)
        return STORE_RELOADED

    async def _audit(self, report: ReloadReport) -> None:
        from agent.audit.store import agent_actor
        from fleet.chain import Entry

        details = {
            "trigger": report.trigger,
            "changed": list(report.changed),
            "applied": list(report.applied),
            "restart_needed": list(report.restart_needed),
            "models_added": list(report.models_added),
            "models_removed": list(report.models_removed),
            "store": report.store,
            "store_error": report.store_error,
        }
        reason = report.error if report.error is not None else report.summary()
        await self._append(Entry("config.reload", None, report.outcome, reason, agent_actor(), details))

    async def _append(self, entry: Any) -> None:
        if self.guard is None:
            return
        from agent.audit.store import AuditFull, AuditUnavailable

        try:
            await self.guard.audit.append(entry)
        except (AuditFull, AuditUnavailable) as exc:
            log.error("reload_not_audited", action=entry.action, error=str(exc))


__all__ = [
    "LIVE_KEYS",
    "ConfigSource",
    "ReloadPlan",
    "ReloadReport",
    "Reloader",
    "STORE_FAILED",
    "STORE_MANAGED_BY_SYNC",
    "STORE_NOT_USED",
    "STORE_RELOADED",
    "StorePlan",
    "diff_settings",
    "effective_settings",
    "plan_pins",
    "plan_register",
    "plan_reload",
    "plan_store",
    "store_mode",
]
