"""Composition root: builds the daemon from settings and owns its lifecycle.

startup (socket bound and accepting, models loading in the background) -> main loop (until
SIGTERM/SIGINT; SIGHUP reloads the config, :mod:`agent.daemon.reload`) -> bounded graceful shutdown
(stop accepting, drain in-flight requests within ``server.shutdown_grace_s``, unload models,
remove the socket). Signal handlers are restored on exit. This is the only module that chooses
concrete classes.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config import PoolSettings, Settings
from agent.daemon import sdnotify
from agent.daemon.catalog import companion_path, discover, info_for_file
from agent.daemon.metrics import HubState, Metrics, StatusSources
from agent.daemon.reload import ConfigSource, Reloader
from agent.engine.base import Engine, ModelInfo
from agent.engine.factory import build_engine, default_threads, engine_fingerprint
from agent.engine.isolation import ChildTrial, Isolation, Verdict, current_build
from agent.engine.pool import ModelPool, pool_options
from agent.server.admin_routes import REFUSED_KEY, RELOAD_KEY, install_metrics
from agent.server.guard import install_guard
from agent.server.http import ApiServer, build_app
from agent.server.limits import ServerLimits, install_throttle_counter
from agent.server.listener import bind_unix, systemd_socket
from fleet.log import get_logger

if TYPE_CHECKING:
    from agent.daemon.scheduler import Scheduler

log = get_logger(__name__)


def build_isolation(settings: Settings) -> Isolation | None:
    """Crash isolation for this daemon (``[isolation]``), or None when it is turned off."""
    if not settings.isolation.enabled:
        return None
    return Isolation(
        settings.state_dir / "isolation",
        build=current_build(),
        fingerprint=lambda info: engine_fingerprint(info, settings),
        runner=ChildTrial(lambda: settings.model_dump(mode="json")),
        timeout_s=settings.isolation.timeout_s,
    )


def _admitted_first(infos: list[ModelInfo], isolation: Isolation | None) -> list[ModelInfo]:
    """``infos`` with the models crash isolation refused moved last, so the default (the first) is one
    that may run; nothing is hashed when no refusal is on record."""
    if isolation is None or not isolation.refused():
        return infos

    def refused(info: ModelInfo) -> bool:
        verdict = isolation.verdict_for(info)
        return verdict is not None and verdict.refused

    flags = [refused(i) for i in infos]
    for info, flag in zip(infos, flags, strict=True):
        if flag:
            log.warning("model_skipped", model=info.id, reason="refused by crash isolation")
    return [i for i, f in zip(infos, flags, strict=True) if not f] + [
        i for i, f in zip(infos, flags, strict=True) if f
    ]


def embedding_info(settings: Settings) -> ModelInfo | None:
    """The ``[embedding] path`` model, if configured and present."""
    path = settings.embedding.path
    if path is None or not path.is_file():
        return None
    info = info_for_file(path, settings.embedding.id)
    return replace(info, task="embedding")


def _cgroup_memory_limit() -> int | None:
    """The tightest cgroup memory limit over this process (the unit's ``MemoryMax=``), if any."""
    from pathlib import Path

    from agent.hardware.probe import probe_cgroup

    try:
        return probe_cgroup(Path("/"))[0].limit_bytes
    except Exception as exc:  # the budget then falls back to physical RAM
        log.warning("cgroup_probe_failed", error=str(exc))
        return None


def _memory_estimate(settings: Settings) -> Callable[[ModelInfo], int]:
    """The GGUF-based estimate, imported on first use (gguf and numpy cost ~20 MB and ~0.4 s of
    start-up; a daemon with no model yet never pays them)."""
    estimate: list[Callable[[ModelInfo], int]] = []

    def lazy(info: ModelInfo) -> int:
        if not estimate:
            from agent.daemon.candidates import model_memory_estimate

            estimate.append(model_memory_estimate(settings))
        return estimate[0](info)

    return lazy


def build_pool(settings: Settings, isolation: Isolation | None = None) -> ModelPool:
    def engines(info: ModelInfo) -> Engine:
        return build_engine(info, settings, isolation, partial(companion_path, settings))

    pool = ModelPool(  # the factory lets sync and the re-probe swap models
        engines,
        estimate=_memory_estimate(settings),
        **pool_options(settings.pool, _cgroup_memory_limit()),
    )
    infos = list(discover(settings))
    # prefer_selected only reorders when there is a choice (two generative models, or a pin);
    # otherwise skip its import (gguf, numpy: ~0.4 s before the socket accepts).
    if sum(i.task != "embedding" for i in infos) > 1 or settings.selection.pin:
        from agent.daemon.candidates import prefer_selected

        infos = prefer_selected(settings, infos)  # the best fit (or the pin) first
    extra = embedding_info(settings)
    if extra is not None and all(i.id != extra.id for i in infos):
        infos.append(extra)
    for info in _admitted_first(infos, isolation):
        pool.add(engines(info), pinned=info.id in settings.pool.pinned)
    return pool


def _sources(pool: ModelPool, guard: Any) -> StatusSources:
    """What /metrics and /admin/status read: the pool, the audit backlog, the policy version."""
    audit = getattr(guard, "audit", None)
    policies = getattr(guard, "policies", None)
    return StatusSources(
        pool=pool,
        audit_backlog=getattr(audit, "backlog", None),
        policy_version=(lambda: policies.current().version) if policies is not None else None,
    )


def _hub_state(sync: Any) -> Callable[[], HubState]:
    def read() -> HubState:
        return HubState(True, bool(sync.client.is_connected), sync.last_sync)

    return read


def _reprobe(settings: Settings, pool: ModelPool) -> Callable[[], Awaitable[object]]:
    """The selection's scheduled re-probe (probe, select with hysteresis, hot-swap), built on its
    first run: a daemon with no model to choose between never imports the selection code (gguf,
    numpy: ~15 MB)."""
    reselector: list[Any] = []

    async def tick() -> object:
        if not pool.models():
            return None
        if not reselector:
            from agent.daemon.reselect import Reselector

            reselector.append(Reselector(settings, pool))
        return await reselector[0].tick()

    return tick


def _start_scheduler(settings: Settings, pool: ModelPool) -> Scheduler:
    """Periodic jobs owned by the daemon itself; other parts add theirs with ``every``."""
    from agent.daemon.scheduler import Scheduler  # apscheduler: imported after READY=1

    sv = settings.service
    scheduler = Scheduler(
        jitter_s=sv.jitter_s, maintenance_window=sv.maintenance_window, intervals_s=sv.intervals_s
    )
    scheduler.every("idle_unload", pool.unload_idle, jitter_s=0.0)
    every = settings.selection.reprobe_interval_s
    scheduler.every("reprobe", _reprobe(settings, pool), interval_s=every, jitter_s=0.1 * every)
    if (settings.state_dir / "registry").is_dir():
        from registry.device import DeviceRegistry

        device = DeviceRegistry(settings.state_dir)
        scheduler.every("rehash", lambda: asyncio.to_thread(device.verify), maintenance=True)
        scheduler.every("gc", lambda: asyncio.to_thread(device.gc), maintenance=True)
    scheduler.start()
    return scheduler


def _loading_status(pool: ModelPool) -> str:
    ids = [m.id for m in pool.models()]
    return f"accepting; loading {', '.join(ids)}" if ids else "accepting; no model installed"


def _serving_status(pool: ModelPool) -> Callable[[], Awaitable[str]]:
    async def wait() -> str:
        await pool.wait_loaded()
        ready = [e.info.id for e in pool.engines() if e.state.value == "ready"]
        return f"serving {', '.join(ready)}" if ready else "serving; no model loaded"

    return wait


def _swap_status(service: sdnotify.ServiceNotifier, pool: ModelPool, event: str, model: str) -> None:
    """A STATUS= line (``systemctl status``) when the model changes."""
    if event == "swapped":
        service.status(f"serving {model}")
    elif event == "swap_failed":
        service.status(f"serving {pool.default_id}; switch to {model} failed (see the journal)")


def _audit_refusal(guard: Any) -> Callable[[Verdict], None]:
    """A refused model becomes an audit record (``model.refused``)."""

    def record(verdict: Verdict) -> None:
        from agent.audit.store import agent_actor
        from fleet.chain import Entry

        submit = getattr(getattr(guard, "audit", None), "submit", None)
        if submit is not None:
            details = {"path": verdict.path, "sha256": verdict.sha256, "detail": verdict.detail[:1000]}
            submit(Entry("model.refused", verdict.model, "refused", verdict.reason, agent_actor(), details))

    return record


def _report_refusal(sync: Any, loop: asyncio.AbstractEventLoop) -> Callable[[Verdict], None]:
    """A refused model becomes an event to the hub (``model`` / ``model_refused``), from any thread."""
    from fleet.messages import Event, Status

    def report(verdict: Verdict) -> None:
        event = Event(
            "model", Status.MODEL_REFUSED.value, verdict.model, f"{verdict.reason}: {verdict.detail}"[:1900]
        )
        loop.call_soon_threadsafe(lambda: loop.create_task(sync.report(event)))

    return report


def _budget_for(pool: PoolSettings) -> int:
    """The pool's memory budget for reloaded ``[pool]`` settings (under the cgroup limit)."""
    budget: int = pool_options(pool, _cgroup_memory_limit())["memory_budget"]
    return budget


class Daemon:
    """The running agent. ``run()`` returns the process exit status."""

    def __init__(
        self,
        settings: Settings,
        pool_factory: Callable[[Settings, Isolation | None], ModelPool] = build_pool,
        source: ConfigSource | None = None,
    ) -> None:
        self.settings = settings
        self._pool_factory = pool_factory
        self._source = source or ConfigSource()  # what a reload re-reads
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        started = time.monotonic()
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True)
        isolation = build_isolation(s)
        died_in = isolation.recover() if isolation is not None else []  # the crash-loop guard
        pool = self._pool_factory(s, isolation)
        inherited = systemd_socket()
        sock = inherited or bind_unix(s.socket_path, s.server.socket_mode, s.server.socket_group)
        app = build_app(
            pool,
            {
                "max_body_bytes": s.server.max_body_bytes,
                "default_max_tokens": s.engine.default_max_tokens,
                "request_timeout_s": s.engine.request_timeout_s,
            },
            started,
        )
        guard = install_guard(app, s)  # authorize and audit every request
        if isolation is not None:
            app[REFUSED_KEY] = lambda: [v.to_dict() for v in isolation.refused()]
            isolation.add_listener(_audit_refusal(guard))
            for verdict in died_in:
                _audit_refusal(guard)(verdict)
        reloader = Reloader(self._source, s, pool, guard, budget_for=_budget_for)
        app[RELOAD_KEY] = reloader  # POST /admin/reload; SIGHUP below
        metrics = Metrics(s.metrics.latency_buckets_s, _sources(pool, guard))
        if s.metrics.enabled:
            install_metrics(app, metrics)  # outermost: times and counts every request
            install_throttle_counter(app, metrics)  # 429s by reason (rate limit, full queue)
        server = ApiServer(
            app,
            sock,
            socket_path=None if inherited else s.socket_path,
            shutdown_grace_s=s.server.shutdown_grace_s,
            max_header_bytes=s.server.max_header_bytes,
            keepalive_timeout_s=s.server.keepalive_timeout_s,
            limits=ServerLimits.from_settings(s.server, metrics if s.metrics.enabled else None),
        )
        loop = asyncio.get_running_loop()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            loop.add_signal_handler(sig, self.request_stop)
        previous[signal.SIGHUP] = signal.getsignal(signal.SIGHUP)
        loop.add_signal_handler(signal.SIGHUP, reloader.trigger, "SIGHUP")
        try:
            await server.start()
            # READY=1 as soon as the socket accepts; the models load after (the STATUS= line
            # follows once they have: the task waits for the loads started below, no await between).
            service = sdnotify.ServiceNotifier.from_env(s.service.notify, healthy=lambda: sock.fileno() != -1)
            service.start(_loading_status(pool), _serving_status(pool))
            reloader.notifier = service
            pool.add_listener(lambda event, model: _swap_status(service, pool, event, model))
            where = "systemd socket" if inherited else str(s.socket_path)
            log.info(
                "listening",
                socket=where,
                version=__version__,
                models=[m.id for m in pool.models()],
                startup_ms=round((time.monotonic() - started) * 1000, 1),
            )
            if not inherited:
                print(
                    f"edge-agent {__version__} listening on {s.socket_path}\n"
                    f"  try: curl --unix-socket {s.socket_path} http://localhost/health\n"
                    f'  or:  edge-agent complete "Edge computing is"',
                    file=sys.stderr,
                    flush=True,
                )
            if not pool.models():
                log.warning("no_model", hint="run `edge-agent demo` or import a model bundle")
            pool.start_loading()
            scheduler = _start_scheduler(s, pool)  # with the re-probe, which may hot-swap models
            metrics.sources.scheduler, metrics.sources.watchdog = scheduler, service.watchdog
            from agent.sync.service import start_sync

            sync = await start_sync(s, pool, guard)  # None unless [hub] host is set
            if sync is not None and isolation is not None:
                isolation.add_listener(_report_refusal(sync, loop))
                for verdict in died_in:
                    _report_refusal(sync, loop)(verdict)
            metrics.sources.hub = _hub_state(sync) if sync is not None else lambda: HubState(False)
            await self._stop.wait()
            log.info("stopping", grace_s=s.server.shutdown_grace_s)
            scheduler.shutdown()
            loop.remove_signal_handler(signal.SIGHUP)
            await reloader.close()
            if sync is not None:
                await sync.close()
            service.stopping()
            await server.stop()
            await service.close()
        finally:
            await pool.close()
            guard.close()
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)
        log.info("stopped")
        return 0


def run(settings: Settings, source: ConfigSource | None = None) -> int:
    return asyncio.run(Daemon(settings, source=source).run())


__all__ = [
    "Daemon",
    "build_engine",
    "build_isolation",
    "build_pool",
    "default_threads",
    "embedding_info",
    "engine_fingerprint",
    "run",
]
