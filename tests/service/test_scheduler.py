"""Periodic jobs: windows and jitter (pure), then a real AsyncIOScheduler running jobs."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta

import pytest

from agent.daemon.scheduler import MaintenanceWindow, Scheduler, next_fire_time
from agent.errors import ConfigError

DAY = datetime(2026, 3, 14)


def at(hh: int, mm: int, day: int = 0) -> datetime:
    return DAY + timedelta(days=day, hours=hh, minutes=mm)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("2:00-4:00", id="single-digit-hour"),
        pytest.param("24:00-01:00", id="hour-24"),
        pytest.param("02:60-03:00", id="minute-60"),
        pytest.param("02:00", id="no-end"),
        pytest.param("02:00-04:00-05:00", id="three-times"),
        pytest.param("", id="empty"),
    ],
)
def test_bad_windows_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="maintenance_window"):
        MaintenanceWindow.parse(text)


@pytest.mark.parametrize(
    ("window", "when", "inside", "next_open"),
    [
        pytest.param("02:00-04:00", at(3, 0), True, at(3, 0), id="inside"),
        pytest.param("02:00-04:00", at(4, 0), False, at(2, 0, 1), id="end-is-exclusive"),
        pytest.param("02:00-04:00", at(1, 0), False, at(2, 0), id="before-today"),
        pytest.param("22:00-02:00", at(23, 30), True, at(23, 30), id="wraps-midnight-late"),
        pytest.param("22:00-02:00", at(1, 0), True, at(1, 0), id="wraps-midnight-early"),
        pytest.param("22:00-02:00", at(12, 0), False, at(22, 0), id="wraps-midnight-closed"),
        pytest.param("00:00-00:00", at(12, 0), True, at(12, 0), id="whole-day"),
    ],
)
def test_window_arithmetic(window: str, when: datetime, inside: bool, next_open: datetime) -> None:
    w = MaintenanceWindow.parse(window)
    assert w.contains(when) is inside
    assert w.next_open(when) == next_open


def test_interval_with_jitter_stays_within_the_jitter() -> None:
    rng = random.Random(7)
    previous = at(10, 0)
    fires = [next_fire_time(previous, at(10, 1), timedelta(hours=1), None, 30, rng) for _ in range(200)]
    assert all(at(11, 0) <= f <= at(11, 0) + timedelta(seconds=30) for f in fires)
    assert len(set(fires)) > 100  # spread, not one fixed time


def test_maintenance_job_fires_only_inside_the_window_with_jitter_clamped() -> None:
    rng = random.Random(1)
    window = MaintenanceWindow.parse("02:00-02:10")
    fires = [next_fire_time(at(3, 0), at(3, 0, 0), timedelta(hours=6), window, 3600, rng) for _ in range(200)]
    # 09:00 is outside: the next opening is 02:00 tomorrow, and the jitter stays inside 10 minutes.
    assert all(at(2, 0, 1) <= f < at(2, 10, 1) for f in fires)
    assert all(window.contains(f) for f in fires)


def test_first_run_and_overdue_runs() -> None:
    rng = random.Random(0)
    now = at(12, 0)
    first = next_fire_time(None, now, timedelta(hours=1), None, 0, rng, first_delay=timedelta(seconds=5))
    assert first == now + timedelta(seconds=5)
    overdue = next_fire_time(at(1, 0), now, timedelta(hours=1), None, 0, rng)
    assert overdue == now  # missed runs coalesce into one now


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"name": "custom"}, "has no interval", id="unknown-name-no-interval"),
        pytest.param({"name": "custom", "interval_s": 0}, "positive interval", id="zero-interval"),
        pytest.param({"name": "gc", "twice": True}, "already registered", id="duplicate"),
    ],
)
def test_registration_errors(kwargs: dict[str, object], match: str) -> None:
    scheduler = Scheduler()
    name = str(kwargs["name"])
    if kwargs.get("twice"):
        scheduler.every(name, lambda: None)
    with pytest.raises(ValueError, match=match):
        scheduler.every(name, lambda: None, interval_s=kwargs.get("interval_s"))  # type: ignore[arg-type]


def test_configured_interval_overrides_the_default() -> None:
    scheduler = Scheduler(intervals_s={"rehash": 7200})
    scheduler.every("rehash", lambda: None, maintenance=True)
    scheduler.every("audit_flush", lambda: None)
    scheduler.every("custom", lambda: None, interval_s=12)
    assert {j.name: j.interval_s for j in scheduler.jobs()} == {
        "audit_flush": 60.0,
        "custom": 12,
        "rehash": 7200,
    }


def test_real_scheduler_runs_sync_and_async_jobs_and_survives_failures() -> None:
    async def main() -> None:
        scheduler = Scheduler(jitter_s=0.0)
        ticks: list[str] = []
        done = asyncio.Event()

        async def async_job() -> None:
            ticks.append("async")
            if ticks.count("async") >= 3:
                done.set()

        def failing() -> None:
            ticks.append("fail")
            raise RuntimeError("disk on fire")

        scheduler.every("tick", async_job, interval_s=0.05, first_after_s=0.01)
        scheduler.start()
        scheduler.every("broken", failing, interval_s=0.05, first_after_s=0.01)  # added while running
        await asyncio.wait_for(done.wait(), 10)
        await asyncio.sleep(0.15)
        jobs = {j.name: j for j in scheduler.jobs()}
        scheduler.shutdown()
        assert jobs["tick"].runs >= 3 and jobs["tick"].failures == 0
        assert jobs["broken"].failures >= 1 and jobs["broken"].last_error == "RuntimeError: disk on fire"
        assert jobs["tick"].next_run is not None
        status = await scheduler.run_now("tick")
        assert status.runs >= 4

    asyncio.run(main())


def test_interval_precedence_config_then_caller_then_default() -> None:
    scheduler = Scheduler(intervals_s={"reprobe": 120})
    scheduler.every("reprobe", lambda: None, interval_s=300)  # [service] intervals_s wins
    scheduler.every("gc", lambda: None, interval_s=3600)  # the caller's own setting beats the default
    scheduler.every("state_publish", lambda: None)  # the default table
    assert {j.name: j.interval_s for j in scheduler.jobs()} == {
        "gc": 3600,
        "reprobe": 120,
        "state_publish": 300.0,
    }
