"""``edge-agent status``: the daemon's ``/health`` and ``/admin/status`` as a readable screen.

Pure: JSON dictionaries in, rich renderables out (the CLI prints them). Missing parts (an older
daemon, no hub, no audit log) render as ``-``, never as an error.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table

_DASH = "-"


def mib(value: Any) -> str:
    if not isinstance(value, int | float):
        return _DASH
    return f"{value / 2**20:,.0f} MiB"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return _DASH
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"


def _when(iso: Any) -> str:
    if not isinstance(iso, str):
        return _DASH
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return iso


def _hub(hub: Any) -> str:
    if not isinstance(hub, dict):
        return _DASH
    if hub.get("error"):
        return f"error: {hub['error']}"
    if not hub.get("configured"):
        return "not configured (offline mode)"
    state = "connected" if hub.get("connected") else "disconnected"
    last = hub.get("last_sync")
    when = (
        datetime.fromtimestamp(last).strftime("%Y-%m-%d %H:%M:%S")
        if isinstance(last, int | float)
        else "never"
    )
    return f"{state}, last sync {when}"


def overview(health: dict[str, Any], status: dict[str, Any]) -> Table:
    """The one-glance summary: service, memory, queue, hub, policy, audit backlog."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    proc = status.get("process") or {}
    memory = status.get("memory") or {}
    budget = memory.get("budget_bytes")
    dog = status.get("watchdog")
    table.add_row("status", f"{health.get('status', _DASH)}  (edge-agent {health.get('version', _DASH)})")
    table.add_row("uptime", duration(status.get("uptime_s", health.get("uptime_s"))))
    table.add_row("default model", str(status.get("default_model") or _DASH))
    table.add_row(
        "memory",
        f"models {mib(memory.get('used_bytes'))} of {mib(budget) if budget else 'no budget'}, "
        f"process RSS {mib(proc.get('rss_bytes'))} (pid {proc.get('pid', _DASH)})",
    )
    table.add_row(
        "queue",
        f"{status.get('queue_depth', _DASH)} generations waiting or running; "
        f"HTTP requests in flight: {status.get('requests_in_flight', _DASH)} (this one included)",
    )
    table.add_row("hub", _hub(status.get("hub")))
    policy = status.get("policy_version")
    table.add_row("policy version", str(policy) if policy is not None else _DASH)
    backlog = status.get("audit_backlog")
    table.add_row("audit backlog", f"{backlog} records not uploaded" if backlog is not None else _DASH)
    swaps = status.get("swaps") or {}
    if swaps:
        table.add_row("model swaps", ", ".join(f"{k} {v}" for k, v in sorted(swaps.items())))
    if isinstance(dog, dict):
        table.add_row("watchdog", f"ping every {dog.get('interval_s')}s, loop lag {dog.get('lag_s')}s")
    return table


def models_table(status: dict[str, Any]) -> Table:
    table = Table(
        "model", "state", "role", "memory", "size", "queue", "idle", title="models", title_justify="left"
    )
    for m in status.get("models", []):
        role = [r for r, on in (("default", m.get("default")), ("pinned", m.get("pinned"))) if on]
        if "default" not in m and m.get("id") == status.get("default_model"):
            role.append("default")  # an older daemon without the role fields
        state = m.get("state", _DASH)
        if m.get("error"):
            state = f"{state} ({m['error'][:60]})"
        table.add_row(
            str(m.get("id")),
            state,
            ", ".join(role) or _DASH,
            mib(m.get("memory_bytes")),
            mib(m.get("size_bytes")),
            str(m.get("queue_depth", _DASH)),
            duration(m.get("idle_s")),
        )
    return table


def jobs_table(status: dict[str, Any]) -> Table | None:
    jobs = status.get("jobs") or []
    if not jobs:
        return None
    table = Table(
        "job",
        "every",
        "runs",
        "failures",
        "last run",
        "next run",
        "last error",
        title="jobs",
        title_justify="left",
    )
    for j in jobs:
        every = duration(j.get("interval_s")) + (" (window)" if j.get("maintenance") else "")
        table.add_row(
            str(j.get("name")),
            every,
            str(j.get("runs", 0)),
            str(j.get("failures", 0)),
            _when(j.get("last_run")),
            _when(j.get("next_run")),
            str(j.get("last_error") or _DASH)[:60],
        )
    return table


def refused_table(status: dict[str, Any]) -> Table | None:
    """Models crash isolation refused on this box, and why (none: no table)."""
    refused = status.get("refused") or []
    if not refused:
        return None
    table = Table("model", "reason", "since", "what happened", title="refused models", title_justify="left")
    for r in refused:
        when = r.get("at")
        since = (
            datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S")
            if isinstance(when, int | float)
            else _DASH
        )
        table.add_row(str(r.get("model")), str(r.get("reason")), since, str(r.get("detail") or _DASH)[:100])
    table.caption = "edge-agent registry retry MODEL tries one again"
    return table


def render(health: dict[str, Any], status: dict[str, Any]) -> RenderableType:
    parts: list[RenderableType] = [overview(health, status), models_table(status)]
    refused = refused_table(status)
    if refused is not None:
        parts.append(refused)
    jobs = jobs_table(status)
    if jobs is not None:
        parts.append(jobs)
    return Group(*parts)


__all__ = ["duration", "jobs_table", "mib", "models_table", "overview", "refused_table", "render"]
