"""Periodic jobs of the daemon, on apscheduler's AsyncIOScheduler (the only importer of apscheduler).

Other modules register their jobs through :meth:`Scheduler.every` by a well-known name. The
interval comes from ``[service] intervals_s`` when set there, else from the caller (who may have
its own setting), else from :data:`DEFAULT_INTERVALS_S`. Every job fires up to ``jitter_s`` late,
so a fleet does not act in lockstep. A job marked ``maintenance=True`` (re-hash of installed
blobs, garbage collection) only fires inside the maintenance window, if one is configured.

Invariants: at most one instance of a job runs at a time and missed runs coalesce into one; a job
that raises is logged and counted, and runs again at its next time (one bad job never stops the
scheduler or the daemon); the window arithmetic (:class:`MaintenanceWindow`,
:func:`next_fire_time`) is pure and takes the time as an argument.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.base import BaseTrigger

from agent.errors import ConfigError
from fleet.log import get_logger

log = get_logger(__name__)

JobFunc = Callable[[], Awaitable[Any] | Any]

DEFAULT_INTERVALS_S: dict[str, float] = {
    "reprobe": 600.0,
    "state_publish": 300.0,
    "audit_flush": 60.0,
    "audit_upload": 300.0,
    "rehash": 86400.0,
    "gc": 86400.0,
    "registry_refresh": 900.0,
    "idle_unload": 30.0,
}
"""Well-known jobs and their default intervals (seconds); ``[service] intervals_s`` overrides them."""

_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True, slots=True)
class MaintenanceWindow:
    """A daily window of local wall-clock time, ``start`` inclusive, ``end`` exclusive.

    ``start > end`` wraps midnight (``22:00-02:00``); ``start == end`` is the whole day.
    """

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> MaintenanceWindow:
        m = _WINDOW.match(text.strip())
        if m is None:
            raise ConfigError(
                f"config error: service.maintenance_window = {text!r}: expected HH:MM-HH:MM (24-hour)"
            )
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        return cls(time(h1, m1), time(h2, m2))

    def contains(self, at: datetime) -> bool:
        t = at.time().replace(tzinfo=None)
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def next_open(self, at: datetime) -> datetime:
        """``at`` if it is inside the window, else the next start of the window after ``at``."""
        if self.contains(at):
            return at
        start = at.replace(hour=self.start.hour, minute=self.start.minute, second=0, microsecond=0)
        return start if start > at else start + timedelta(days=1)

    def remaining(self, at: datetime) -> timedelta:
        """How long the window stays open after ``at`` (``at`` must be inside it)."""
        if self.start == self.end:
            return timedelta(days=1)
        end = at.replace(hour=self.end.hour, minute=self.end.minute, second=0, microsecond=0)
        if end <= at:
            end += timedelta(days=1)
        return end - at

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"


def next_fire_time(
    previous: datetime | None,
    now: datetime,
    interval: timedelta,
    window: MaintenanceWindow | None,
    jitter_s: float,
    rng: random.Random,
    first_delay: timedelta | None = None,
) -> datetime:
    """When a job fires next: ``interval`` after its previous run (the first run ``first_delay``
    after ``now``), moved into the window when there is one, plus a jitter that never leaves it."""
    if previous is None:
        base = now + (first_delay if first_delay is not None else interval)
    else:
        base = max(previous + interval, now)
    if window is None:
        return base + timedelta(seconds=rng.uniform(0, jitter_s)) if jitter_s else base
    at = window.next_open(base)
    room = max(0.0, window.remaining(at).total_seconds() - 1.0)
    spread = min(jitter_s, room)
    return at + timedelta(seconds=rng.uniform(0, spread)) if spread else at


class _WindowTrigger(BaseTrigger):  # type: ignore[misc]
    """An interval trigger with jitter that only fires inside a maintenance window."""

    def __init__(
        self,
        interval: timedelta,
        window: MaintenanceWindow | None,
        jitter_s: float,
        rng: random.Random,
        first_delay: timedelta | None,
    ) -> None:
        self.interval = interval
        self.window = window
        self.jitter_s = jitter_s
        self.rng = rng
        self.first_delay = first_delay

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        return next_fire_time(
            previous_fire_time, now, self.interval, self.window, self.jitter_s, self.rng, self.first_delay
        )

    def __str__(self) -> str:
        return f"every {self.interval}" + (f" in {self.window}" if self.window else "")


@dataclass
class JobStatus:
    """What ``/admin/status`` shows about a job."""

    name: str
    interval_s: float
    maintenance: bool
    runs: int = 0
    failures: int = 0
    last_run: datetime | None = None
    last_error: str | None = None
    next_run: datetime | None = field(default=None)


class Scheduler:
    """Registers and runs the daemon's periodic jobs (see the module docstring)."""

    def __init__(
        self,
        *,
        jitter_s: float = 30.0,
        maintenance_window: str | MaintenanceWindow | None = None,
        intervals_s: dict[str, float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.jitter_s = jitter_s
        window = maintenance_window
        self.window = MaintenanceWindow.parse(window) if isinstance(window, str) else window
        self.overrides_s = dict(intervals_s or {})
        self._rng = rng or random.Random()  # noqa: S311 -- spreading jobs in time, not secrets
        self._scheduler: AsyncIOScheduler | None = None
        self._jobs: dict[str, JobStatus] = {}
        self._pending: dict[str, tuple[JobFunc, _WindowTrigger]] = {}

    def every(
        self,
        name: str,
        func: JobFunc,
        *,
        interval_s: float | None = None,
        maintenance: bool = False,
        jitter_s: float | None = None,
        first_after_s: float | None = None,
    ) -> None:
        """Run ``func`` (sync or async) periodically; the configured interval for ``name`` wins."""
        if name in self._jobs:
            raise ValueError(f"job {name!r} is already registered")
        interval = self.overrides_s.get(
            name, interval_s if interval_s is not None else DEFAULT_INTERVALS_S.get(name)
        )
        if interval is None:
            raise ValueError(f"job {name!r} has no interval: pass interval_s or configure it")
        if interval <= 0:
            raise ValueError(f"job {name!r} needs a positive interval, not {interval}")
        trigger = _WindowTrigger(
            timedelta(seconds=interval),
            self.window if maintenance else None,
            self.jitter_s if jitter_s is None else jitter_s,
            self._rng,
            timedelta(seconds=first_after_s) if first_after_s is not None else None,
        )
        self._jobs[name] = JobStatus(name, interval, maintenance)
        self._pending[name] = (func, trigger)
        if self._scheduler is not None:
            self._add(name)

    def _add(self, name: str) -> None:
        assert self._scheduler is not None
        func, trigger = self._pending[name]
        self._scheduler.add_job(
            self._runner(name, func),
            trigger,
            id=name,
            name=name,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )

    def _runner(self, name: str, func: JobFunc) -> Callable[[], Awaitable[None]]:
        status = self._jobs[name]

        async def run() -> None:
            status.last_run = datetime.now().astimezone()
            try:
                result = func()
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failing job is logged and retried at its next time
                status.failures += 1
                status.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("job_failed", job=name)
            else:
                status.last_error = None
            finally:
                status.runs += 1

        return run

    def start(self) -> None:
        """Start on the running event loop; jobs registered later are added as they come."""
        self._scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        for name in self._pending:
            self._add(name)
        self._scheduler.start()
        log.info(
            "scheduler_started", jobs=sorted(self._jobs), window=str(self.window) if self.window else None
        )

    async def run_now(self, name: str) -> JobStatus:
        """Run a job immediately (operators, tests); raises ``KeyError`` for an unknown name."""
        func, _ = self._pending[name]
        await self._runner(name, func)()
        return self._jobs[name]

    def jobs(self) -> list[JobStatus]:
        if self._scheduler is not None:
            for job in self._scheduler.get_jobs():
                if job.id in self._jobs:
                    self._jobs[job.id].next_run = job.next_run_time
        return [self._jobs[name] for name in sorted(self._jobs)]

    def shutdown(self) -> None:
        if self._scheduler is not None and self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        self._scheduler = None


__all__ = [
    "DEFAULT_INTERVALS_S",
    "JobFunc",
    "JobStatus",
    "MaintenanceWindow",
    "Scheduler",
    "next_fire_time",
]
