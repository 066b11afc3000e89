"""Composition root: builds the daemon from settings and owns its lifecycle.

startup (socket bound and accepting, models loading in the background) -> main loop (until
SIGTERM/SIGINT; SIGHUP reloads the config, :mod:`agent.daemon.reload`) -> bounded graceful shutdown
(stop accepting, drain in-flight requests within ``server.shutdown_grace_s``, unload models,
remove the socket). Signal handlers are restored on exit. This is the only module that chooses
concrete classes.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.config import PoolSettings, Settings
from agent.daemon import sdnotify
from agent.daemon.catalog import companion_path, discover, info_for_file, log_refusal
from agent.daemon.reload import ConfigSource, Reloader
from agent.engine.base import Engine, ModelInfo
from agent.engine.factory import build_engine, engine_fingerprint
from agent.engine.isolation import ChildTrial, Isolation, Verdict, current_build
from agent.engine.pool import ModelPool, pool_options
from agent.errors import ConfigError
from agent.health import HealthBook
from agent.server.admin_routes import REFUSED_KEY, RELOAD_KEY
from agent.server.guard import Guard, open_guard
from agent.server.http import ApiServer, build_app
from agent.server.limits import ServerLimits
from agent.server.listener import bind_unix, remove_socket_file, systemd_socket
from agent.server.metrics import HubState, Metrics, StatusSources
from fleet.log import get_logger
from registry.device import DeviceRegistry
from registry.exceptions import RegistryError

if TYPE_CHECKING:
    from agent.daemon.scheduler import Scheduler
    from agent.sync.service import SyncService

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


def build_pool(
    settings: Settings, isolation: Isolation | None = None, registry: DeviceRegistry | None = None
) -> ModelPool:
    """The model pool with the models this box may serve (the best fit first: the default)."""
    registry = (
        registry if registry is not None else DeviceRegistry(settings.state_dir, on_refusal=log_refusal)
    )

    def engines(info: ModelInfo) -> Engine:
        return build_engine(info, settings, isolation, partial(companion_path, settings, registry=registry))

    pool = ModelPool(  # the factory lets sync and the re-probe swap models
        engines,
        estimate=_memory_estimate(settings),
        **pool_options(settings.pool, _cgroup_memory_limit()),
    )
    infos = list(discover(settings, registry))
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


def _sources(pool: ModelPool, guard: Guard) -> StatusSources:
    """What /metrics and /admin/status read: the pool, the audit backlog, the policy version."""
    return StatusSources(
        pool=pool,
        audit_backlog=guard.audit.backlog,
        policy_version=lambda: guard.policies.current().version,
    )


def _hub_state(sync: SyncService) -> Callable[[], HubState]:
    def read() -> HubState:
        totals = sync.fetcher.totals if sync.fetcher is not None else None
        return HubState(
            True, bool(sync.client.is_connected), sync.last_sync, sync.metadata.hub_online, totals
        )

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


def _start_scheduler(settings: Settings, pool: ModelPool, registry: DeviceRegistry) -> Scheduler:
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
        scheduler.every("rehash", lambda: asyncio.to_thread(registry.verify), maintenance=True)
        scheduler.every("gc", lambda: asyncio.to_thread(registry.gc), maintenance=True)
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


def _audit_refusal(guard: Guard) -> Callable[[Verdict], None]:
    """A refused model becomes an audit record (``model.refused``)."""

    def record(verdict: Verdict) -> None:
        from agent.audit.store import agent_actor
        from fleet.chain import Entry

        details = {"path": verdict.path, "sha256": verdict.sha256, "detail": verdict.detail[:1000]}
        guard.audit.submit(
            Entry("model.refused", verdict.model, "refused", verdict.reason, agent_actor(), details)
        )

    return record


def _report_refusal(sync: SyncService, loop: asyncio.AbstractEventLoop) -> Callable[[Verdict], None]:
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


class _Fanout:
    """The registry's refusal callback: every target hears ``(reason, detail)``; none may break it."""

    def __init__(self) -> None:
        self.targets: list[Callable[[str, str], None]] = [log_refusal]

    def __call__(self, reason: str, detail: str) -> None:
        for target in list(self.targets):
            try:
                target(reason, detail)
            except Exception:
                log.exception("refusal_target_failed", reason=reason)


def _audit_registry_refusal(guard: Guard) -> Callable[[str, str], None]:
    def record(reason: str, detail: str) -> None:
        from agent.audit.store import agent_actor
        from fleet.chain import Entry

        guard.audit.submit(
            Entry("registry.refused", None, "refused", reason, agent_actor(), {"detail": detail[:1000]})
        )

    return record


def _restore_signals(loop: asyncio.AbstractEventLoop, previous: dict[signal.Signals, Any]) -> None:
    for sig, handler in previous.items():
        loop.remove_signal_handler(sig)
        signal.signal(sig, handler)


def _close_socket(sock: socket.socket, path: Path | None) -> None:
    """The listening socket, if the server did not take it down (a failed start): closed, file removed."""
    sock.close()
    if path is not None:
        remove_socket_file(path)


def _limits(s: Settings) -> dict[str, Any]:
    return {
        "max_body_bytes": s.server.max_body_bytes,
        "default_max_tokens": s.engine.default_max_tokens,
        "request_timeout_s": s.engine.request_timeout_s,
    }


def _announce(s: Settings, pool: ModelPool, inherited: bool, started: float) -> None:
    log.info(
        "listening",
        socket="systemd socket" if inherited else str(s.socket_path),
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


async def build_sync(
    settings: Settings,
    pool: ModelPool,
    guard: Guard,
    registry: DeviceRegistry,
    health: HealthBook | None = None,
) -> SyncService | None:
    """Fleet sync when ``[hub] host`` is set; None otherwise.

    A device that is not enrolled and has no ``[hub] device_id`` cannot sync: that is logged, never
    fatal; a missing certificate or key file, or a key file that group or others may read, is a
    :class:`ConfigError` (the start-up stops what it started and the service exits 2).
    """
    if settings.hub.host is None:
        return None
    from agent.policy import accept_policy
    from agent.sync.errors import SYNC_FAILURES
    from agent.sync.service import SyncService, options_from_settings
    from fleet.device_key import ensure_device_key
    from fleet.errors import InsecureKeyFile
    from fleet.mqtt import check_private_key

    device_id = settings.hub.device_id
    if device_id is None:
        try:
            device_id = registry.enrollment().device_id
        except RegistryError as exc:
            log.error("sync_disabled", reason=str(exc))
            return None
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(settings.hub, name)
        if not Path(path).is_file():
            raise ConfigError(f"config error: hub.{name} = {str(path)!r}: file not found")
    key_file = Path(str(settings.hub.key_file))
    try:  # the device's broker identity: never readable by API users (docs/security.md)
        check_private_key(key_file)
    except InsecureKeyFile as exc:
        raise ConfigError(f"config error: hub.key_file = {str(key_file)!r}: {exc}") from None
    hardware: dict[str, Any] = {}
    try:
        from agent.hardware.report import hardware_report

        hardware = hardware_report(settings.state_dir, timeout_s=1.0)
    except Exception as exc:  # the hardware profile is informative only
        log.warning("sync_hardware_probe_failed", error=repr(exc))
    key_hex = ensure_device_key(settings.state_dir).public.raw.hex()
    options = options_from_settings(
        settings, device_id, agent_version=__version__, hardware=hardware, audit_key_hex=key_hex
    )

    def policy_sink(document: bytes, version: int) -> None:
        accept_policy(settings.state_dir, document, version, audit=guard.audit)

    def policy_version() -> str | None:
        return str(guard.policies.current().version)

    try:
        service = SyncService(
            options,
            settings.state_dir,
            pool,
            audit=guard.audit,
            policy_sink=policy_sink,
            policy_version=policy_version,
            registry=registry,
            health=health,
        )
    except SYNC_FAILURES as exc:  # the sync ledger cannot be opened: serve locally, say why
        log.error("sync_disabled", reason=str(exc))
        return None
    await service.start()
    log.info("sync_started", device=device_id, broker=f"{settings.hub.host}:{settings.hub.port}")
    return service


SHUTDOWN_SLACK_S = 20.0
"""Beyond ``[server] shutdown_grace_s`` (the drain of in-flight requests), what the rest of the
shutdown may take in all: unloading models, closing the audit log, the hub connection."""


async def _awaited(awaitable: Awaitable[object]) -> object:
    return await awaitable


class Stopper:
    """What the daemon started, and how to stop it: closers run in the reverse order of their start,
    all within one deadline; a closer that fails or runs out of time is logged and the rest still run.

    Invariant: a part is pushed right after it started, so a failure at any start-up step stops
    exactly what was started before it.
    """

    def __init__(self) -> None:
        self._closers: list[tuple[str, Callable[[], object]]] = []
        self.stopped: list[str] = []
        """The closers that ran, in order (for the operator's log and the tests)."""

    def push(self, name: str, closer: Callable[[], object]) -> None:
        self._closers.append((name, closer))

    @property
    def started(self) -> list[str]:
        return [name for name, _ in self._closers]

    async def stop(self, deadline_s: float) -> list[str]:
        """Run every closer, newest first; return the names of those that failed or timed out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        failed: list[str] = []
        while self._closers:
            name, closer = self._closers.pop()
            self.stopped.append(name)
            try:
                result = closer()
                if inspect.isawaitable(result):
                    await asyncio.wait_for(_awaited(result), max(0.05, deadline - loop.time()))
            except TimeoutError:
                failed.append(name)
                log.error("shutdown_step_timed_out", step=name, deadline_s=deadline_s)
            except Exception:
                failed.append(name)
                log.exception("shutdown_step_failed", step=name)
        return failed


class Daemon:
    """The running agent. ``run()`` returns the process exit status.

    Start-up (:meth:`_start`) builds and connects every part in order, pushing each onto a
    :class:`Stopper` as soon as it runs; the main loop waits for SIGTERM/SIGINT; the shutdown runs in
    ``finally`` with one deadline, so a failure at any start-up step (a bad policy, a missing hub
    certificate) stops what was already started.
    """

    def __init__(
        self,
        settings: Settings,
        pool_factory: Callable[[Settings, Isolation | None, DeviceRegistry], ModelPool] = build_pool,
        source: ConfigSource | None = None,
    ) -> None:
        self.settings = settings
        self._pool_factory = pool_factory
        self._source = source or ConfigSource()  # what a reload re-reads
        self._stop = asyncio.Event()
        self.stopper = Stopper()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> int:
        s = self.settings
        try:
            await self._start(time.monotonic())
            await self._stop.wait()
            log.info("stopping", grace_s=s.server.shutdown_grace_s)
        finally:
            await self.stopper.stop(s.server.shutdown_grace_s + SHUTDOWN_SLACK_S)
        log.info("stopped")
        return 0

    async def _start(self, started: float) -> None:
        s, stop = self.settings, self.stopper
        loop = asyncio.get_running_loop()
        s.state_dir.mkdir(parents=True, exist_ok=True)
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        stop.push("signals", lambda: _restore_signals(loop, previous))

        refusals = _Fanout()  # store refusals: into the audit log, and to the hub once sync runs
        registry = DeviceRegistry(s.state_dir, on_refusal=refusals)  # the daemon's one registry
        isolation = build_isolation(s)
        died_in = isolation.recover() if isolation is not None else []  # the crash-loop guard
        pool = self._pool_factory(s, isolation, registry)
        guard = open_guard(s, pool)  # the audit log and the access policy
        stop.push("guard", guard.close)
        stop.push("pool", pool.close)  # models unload before the audit log closes (their records)
        refusals.targets.append(_audit_registry_refusal(guard))

        inherited = systemd_socket()
        if inherited is not None and (s.server.socket_group is not None or s.server.socket_mode != 0o660):
            log.warning(  # the socket unit's SocketMode=/SocketGroup= apply, not the config's
                "socket_settings_ignored",
                reason="socket activation: the socket unit sets the mode and group",
                socket_mode=f"{s.server.socket_mode:04o}",
                socket_group=s.server.socket_group,
            )
        sock = inherited or bind_unix(s.socket_path, s.server.socket_mode, s.server.socket_group)
        stop.push("socket", lambda: _close_socket(sock, None if inherited else s.socket_path))
        metrics = Metrics(s.metrics.latency_buckets_s, _sources(pool, guard)) if s.metrics.enabled else None
        health = HealthBook()  # fed by the API, reported by sync (staged rollouts)
        app = build_app(pool, _limits(s), started, guard=guard, metrics=metrics, health=health)
        if isolation is not None:
            app[REFUSED_KEY] = lambda: [v.to_dict() for v in isolation.refused()]
            isolation.add_listener(_audit_refusal(guard))
            for verdict in died_in:
                _audit_refusal(guard)(verdict)
        reloader = Reloader(self._source, s, pool, guard, budget_for=_budget_for)
        app[RELOAD_KEY] = reloader  # POST /admin/reload; SIGHUP below
        stop.push("reloader", reloader.close)
        loop.add_signal_handler(signal.SIGHUP, reloader.trigger, "SIGHUP")
        stop.push("sighup", lambda: loop.remove_signal_handler(signal.SIGHUP))

        server = ApiServer(
            app,
            sock,
            socket_path=None if inherited else s.socket_path,
            shutdown_grace_s=s.server.shutdown_grace_s,
            max_header_bytes=s.server.max_header_bytes,
            keepalive_timeout_s=s.server.keepalive_timeout_s,
            limits=ServerLimits.from_settings(s.server, metrics),
        )
        service = sdnotify.ServiceNotifier.from_env(s.service.notify, healthy=lambda: sock.fileno() != -1)
        stop.push("notifier", service.close)  # after the server stopped
        await server.start()
        stop.push("server", server.stop)
        # READY=1 as soon as the socket accepts; the models load after (the STATUS= line follows once
        # they have: the task waits for the loads started below, no await between).
        service.start(_loading_status(pool), _serving_status(pool))
        stop.push("stopping", service.stopping)  # STOPPING=1 first, then the drain
        reloader.notifier = service
        pool.add_listener(lambda event, model: _swap_status(service, pool, event, model))
        _announce(s, pool, inherited is not None, started)
        pool.start_loading()
        scheduler = _start_scheduler(s, pool, registry)  # with the re-probe, which may hot-swap models
        stop.push("scheduler", scheduler.shutdown)
        if metrics is not None:
            metrics.sources.scheduler, metrics.sources.watchdog = scheduler, service.watchdog
        sync = await build_sync(s, pool, guard, registry, health)  # None unless [hub] host is set
        if sync is not None:
            stop.push("sync", sync.close)
            refusals.targets.append(sync.refused)
            if isolation is not None:
                isolation.add_listener(_report_refusal(sync, loop))
                for verdict in died_in:
                    _report_refusal(sync, loop)(verdict)
        if metrics is not None:
            metrics.sources.hub = _hub_state(sync) if sync is not None else lambda: HubState(False)


def run(settings: Settings, source: ConfigSource | None = None) -> int:
    return asyncio.run(Daemon(settings, source=source).run())


__all__ = ["Daemon", "Stopper", "build_isolation", "build_pool", "build_sync", "embedding_info", "run"]
