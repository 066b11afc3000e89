"""`edge-agent status` rendering: pure, from the JSON the daemon returns."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from agent.cli.status import duration, mib, render

HEALTH = {"status": "ok", "version": "0.1.0", "uptime_s": 3725.0}
FULL: dict[str, Any] = {
    "uptime_s": 3725.0,
    "default_model": "gemma",
    "models": [
        {
            "id": "gemma",
            "state": "ready",
            "default": True,
            "pinned": False,
            "memory_bytes": 434 << 20,
            "size_bytes": 241 << 20,
            "queue_depth": 2,
            "idle_s": 3.0,
            "error": None,
        },
        {
            "id": "old",
            "state": "failed",
            "default": False,
            "pinned": True,
            "memory_bytes": 0,
            "size_bytes": 100 << 20,
            "queue_depth": 0,
            "idle_s": None,
            "error": "cannot load: truncated",
        },
    ],
    "queue_depth": 2,
    "requests_in_flight": 1,
    "memory": {"used_bytes": 434 << 20, "budget_bytes": 2048 << 20},
    "process": {"pid": 4242, "rss_bytes": 480 << 20},
    "hub": {"configured": True, "connected": False, "last_sync": None},
    "policy_version": 0,
    "audit_backlog": 17,
    "swaps": {"ok": 1, "smoke_failed": 1},
    "jobs": [
        {
            "name": "gc",
            "interval_s": 86400,
            "maintenance": True,
            "runs": 0,
            "failures": 0,
            "last_run": None,
            "next_run": "2026-03-15T02:03:04+00:00",
            "last_error": None,
        }
    ],
    "watchdog": {"interval_s": 15.0, "lag_s": 0.002, "pings": 9},
    "refused": [
        {
            "model": "smollm2-q4_1",
            "reason": "SIGILL",
            "detail": "the trial process died by SIGILL (exit status -4)",
            "at": 1796655370.0,
        }
    ],
}


def text(health: dict[str, Any], status: dict[str, Any]) -> str:
    console = Console(width=160, record=True, force_terminal=False)
    console.print(render(health, status))
    return console.export_text()


def test_everything_an_operator_needs_is_on_screen() -> None:
    out = text(HEALTH, FULL)
    for needle in (
        "gemma",
        "ready",
        "default",
        "434 MiB of 2,048 MiB",
        "RSS 480 MiB",
        "2 generations waiting",
        "disconnected, last sync never",
        "policy version  0",
        "17 records not uploaded",
        "failed (cannot load: truncated)",
        "pinned",
        "ok 1, smoke_failed 1",
        "24h00m (window)",
        "2026-03-15 02:03:04",
        "ping every 15.0s",
        "refused models",
        "smollm2-q4_1",
        "SIGILL",
        "died by SIGILL",
        "edge-agent registry retry MODEL",
    ):
        assert needle in out, needle


@pytest.mark.parametrize(
    "status",
    [
        pytest.param(
            {"default_model": "m", "models": [{"id": "m", "state": "ready", "queue_depth": 0}]},
            id="older-daemon",
        ),
        pytest.param({"models": []}, id="no-models"),
        pytest.param({**FULL, "hub": {"error": "RuntimeError: down"}}, id="hub-source-failed"),
    ],
)
def test_partial_status_renders(status: dict[str, Any]) -> None:
    out = text({"status": "loading"}, status)
    assert "loading" in out


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(None, "-"), (5, "5s"), (119, "119s"), (600, "10m"), (7300, "2h01m"), (200000, "2d7h")],
    ids=["none", "seconds", "under-two-minutes", "minutes", "hours", "days"],
)
def test_duration(seconds: float | None, shown: str) -> None:
    assert duration(seconds) == shown


def test_mib() -> None:
    assert (mib(None), mib(3 << 20)) == ("-", "3 MiB")
