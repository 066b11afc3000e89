"""Prometheus metrics of the daemon (text exposition format for ``GET /metrics``).

Two kinds of series:
- event series updated as things happen: requests by route, method, status and model; request
  latency histograms by route and model; tokens in and out by model; the socket server's limits
  (connections refused, timeouts by phase, requests rejected before the application, ``429``s by
  reason, open connections against the limit), reported through the
  :class:`agent.server.limits.LimitEvents` methods below;
- state series read at scrape time from :class:`StatusSources`: loaded models and their memory,
  queue depth, memory budget, selection changes (hot swaps by outcome), sync state, audit backlog,
  policy version, scheduled jobs, event-loop lag, and the process's own CPU and memory.

Invariants: each :class:`Metrics` has its own registry (no global state, so tests and several
apps in one process never collide); label values are bounded (the limit series take one of a
fixed set each, all present at zero from the start) — the route label is the matched
route's pattern, never the raw path, and unknown paths are ``other``; a failing source is
skipped for that scrape and never fails the scrape.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from agent import __version__
from fleet.log import get_logger

if TYPE_CHECKING:
    from agent.engine.pool import ModelPool


class Jobs(Protocol):
    """The daemon's scheduler as status and metrics see it (:class:`agent.daemon.scheduler.Scheduler`):
    ``jobs()`` gives dataclasses with ``name``, ``runs``, ``failures``, ``last_run``, ``next_run``."""

    def jobs(self) -> Sequence[Any]: ...


class WatchdogView(Protocol):
    """The sd_notify watchdog as status and metrics see it (:class:`agent.daemon.sdnotify.Watchdog`)."""

    @property
    def interval(self) -> float: ...

    @property
    def lag_s(self) -> float: ...

    @property
    def pings(self) -> int: ...


log = get_logger(__name__)

DEFAULT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_REJECTED = ("400", "414", "417", "431", "500")
"""agent.server.limits.REJECTED_STATUSES (kept here so this module needs no aiohttp import)."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The classic text format every Prometheus server (and ``generate_latest``'s output) speaks."""


@dataclass(frozen=True, slots=True)
class HubState:
    """The sync connection as the status and metrics report it."""

    configured: bool
    connected: bool = False
    last_sync: float | None = None
    """Unix time of the last successful sync round."""
    hub_online: bool | None = None
    """The hub's last announced presence (None before any)."""
    transfers: Any = None
    """The fetcher's running totals (``agent.sync.fetcher.TransferTotals``), when sync runs."""


@dataclass
class StatusSources:
    """Where state comes from; each is optional (an absent part of the daemon reports nothing).

    ``audit_backlog`` may block (it reads the audit store): it is called in a worker thread.
    """

    pool: ModelPool | None = None
    audit_backlog: Callable[[], int] | None = None
    policy_version: Callable[[], str | int | None] | None = None
    hub: Callable[[], HubState] | None = None
    scheduler: Jobs | None = None
    watchdog: WatchdogView | None = None


@dataclass
class Snapshot:
    """Values read from the blocking sources just before a scrape or a status request."""

    audit_backlog: int | None = None


class Metrics:
    """The daemon's metrics; :meth:`render` produces the exposition text."""

    def __init__(
        self, buckets: Iterable[float] = DEFAULT_BUCKETS, sources: StatusSources | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.sources = sources or StatusSources()
        self.snapshot = Snapshot()
        r = self.registry
        self.requests = Counter(
            "edge_agent_requests",
            "HTTP requests answered, by route pattern, method, status and model",
            ["route", "method", "status", "model"],
            registry=r,
        )
        self.latency = Histogram(
            "edge_agent_request_duration_seconds",
            "Time from request to the end of its response (streams included), by route and model",
            ["route", "model"],
            buckets=tuple(buckets),
            registry=r,
        )
        self.tokens = Counter(
            "edge_agent_tokens",
            "Tokens processed, by model and direction (in, out)",
            ["model", "direction"],
            registry=r,
        )
        self.in_flight = Gauge("edge_agent_requests_in_flight", "Requests being answered now", registry=r)
        self.active = 0
        """The same number as ``in_flight``, readable without prometheus_client internals."""
        self._init_limit_series()
        ProcessCollector(namespace="edge_agent", registry=r)
        r.register(_StateCollector(self))

    def _init_limit_series(self) -> None:
        r = self.registry
        self.connections_open = Gauge(
            "edge_agent_connections_open", "Connections open on the API socket now", registry=r
        )
        self.connections_limit = Gauge(
            "edge_agent_connections_limit", "max_connections of the API socket", registry=r
        )
        self.connections_refused = self._present_counter(
            "edge_agent_connections_refused",
            "Connections refused beyond max_connections: over_limit (503 and close), "
            "dropped (closed unread, beyond twice the limit)",
            "reason",
            ("over_limit", "dropped"),
        )
        self.request_timeouts = self._present_counter(
            "edge_agent_request_timeouts",
            "Connections closed by a timeout: idle (nothing sent), headers and body (408), "
            "write (the client stopped reading; aborted)",
            "phase",
            ("idle", "headers", "body", "write"),
        )
        self.requests_rejected = self._present_counter(
            "edge_agent_requests_rejected",
            "Requests answered with an error before the application saw them (malformed HTTP, "
            "oversized headers or request line, unknown Expect); not in edge_agent_requests_total",
            "status",
            (*_REJECTED, "other"),
        )
        self.requests_throttled = self._present_counter(
            "edge_agent_requests_throttled",
            "Requests answered 429, by reason: rate_limit (the role's requests per minute), "
            "queue_full (the model's queue); also counted in edge_agent_requests_total",
            "reason",
            ("rate_limit", "queue_full"),
        )

    def _present_counter(self, name: str, doc: str, label: str, values: Sequence[str]) -> Counter:
        """A counter with one label whose every value is exported at zero from the start."""
        counter = Counter(name, doc, [label], registry=self.registry)
        for value in values:
            counter.labels(value)
        return counter

    # -- agent.server.limits.LimitEvents ----------------------------------------------------------

    def connections_changed(self, open_: int, limit: int) -> None:
        self.connections_open.set(open_)
        self.connections_limit.set(limit)

    def connection_refused(self, reason: str) -> None:
        self.connections_refused.labels(reason).inc()

    def request_timed_out(self, phase: str) -> None:
        self.request_timeouts.labels(phase).inc()

    def request_rejected(self, status: str) -> None:
        self.requests_rejected.labels(status).inc()

    def request_throttled(self, reason: str) -> None:
        self.requests_throttled.labels(reason).inc()

    # -- requests --------------------------------------------------------------------------------

    def request_started(self) -> None:
        self.active += 1
        self.in_flight.inc()

    def request_finished(self) -> None:
        self.active -= 1
        self.in_flight.dec()

    def observe_request(
        self,
        route: str,
        method: str,
        status: int,
        model: str,
        duration_s: float,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        self.requests.labels(route, method, str(status), model).inc()
        self.latency.labels(route, model).observe(duration_s)
        if prompt_tokens:
            self.tokens.labels(model, "in").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(model, "out").inc(completion_tokens)

    async def refresh(self) -> Snapshot:
        """Read the blocking sources off the event loop."""
        backlog = self.sources.audit_backlog
        if backlog is not None:
            try:
                self.snapshot.audit_backlog = int(await asyncio.to_thread(backlog))
            except Exception as exc:  # a broken source must not break the scrape
                log.warning("metrics_source_failed", source="audit_backlog", error=str(exc))
                self.snapshot.audit_backlog = None
        return self.snapshot

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _safe(name: str, read: Callable[[], Any]) -> Any:
    try:
        return read()
    except Exception as exc:
        log.warning("metrics_source_failed", source=name, error=str(exc))
        return None


REASK_REASONS = ("timeout", "reconnect", "hub_back", "not_found")
MIRROR_REASONS = ("unavailable", "timeout", "bad_response", "wrong_bytes")
"""agent.sync.mirror.MIRROR_REASONS (kept here so this module needs no aiohttp import)."""


def _transfer_metrics(hub: HubState) -> Iterator[Metric]:
    """Model transfers from the hub: bytes, chunk requests, resumed and re-asked chunks."""
    if hub.hub_online is not None:
        yield GaugeMetricFamily(
            "edge_agent_sync_hub_online", "1 while the hub announces itself online", value=int(hub.hub_online)
        )
    t = hub.transfers
    if t is None:
        return
    yield GaugeMetricFamily("edge_agent_sync_transfers_active", "Model transfers running", value=t.active)
    yield CounterMetricFamily(
        "edge_agent_sync_transfer_bytes", "Verified chunk bytes received", value=t.bytes_received
    )
    yield CounterMetricFamily(
        "edge_agent_sync_chunk_requests",
        "Chunk requests sent (acknowledged by the broker)",
        value=t.chunks_requested,
    )
    yield CounterMetricFamily(
        "edge_agent_sync_chunks_resumed",
        "Chunks found intact in partial files at a transfer's start",
        value=t.chunks_resumed,
    )
    reasked = CounterMetricFamily(
        "edge_agent_sync_chunks_reasked", "Chunk requests asked again, by reason", labels=["reason"]
    )
    for reason in REASK_REASONS:
        reasked.add_metric([reason], t.reasked.get(reason, 0))
    yield reasked
    yield CounterMetricFamily(
        "edge_agent_sync_mirror_bytes",
        "Verified chunk bytes that came from HTTP mirrors",
        value=t.mirror_bytes,
    )
    yield CounterMetricFamily(
        "edge_agent_sync_mirror_bad_chunks",
        "Chunks a mirror served with wrong bytes (refused, fetched elsewhere)",
        value=t.mirror_bad_chunks,
    )
    skipped = CounterMetricFamily(
        "edge_agent_sync_mirrors_skipped", "Mirrors given up on for a transfer, by reason", labels=["reason"]
    )
    for reason in MIRROR_REASONS:
        skipped.add_metric([reason], t.mirror_skipped.get(reason, 0))
    yield skipped
    gate = t.gate
    if gate is not None:
        waiting = GaugeMetricFamily(
            "edge_agent_sync_transfer_waiting",
            "1 while model transfers wait, by reason (download window closed, rate limit)",
            labels=["reason"],
        )
        for reason in ("window", "rate"):
            waiting.add_metric([reason], int(gate.waiting == reason))
        yield waiting
        yield CounterMetricFamily(
            "edge_agent_sync_rate_wait_seconds",
            "Seconds model transfers waited for the rate limit",
            value=gate.rate_wait_s,
        )


class _StateCollector:
    """Scrape-time series from the pool, the sync, the audit log, the scheduler and the watchdog."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # series vary with the sources; nothing to pre-declare

    def collect(self) -> Iterator[Metric]:
        src = self._metrics.sources
        info = InfoMetricFamily("edge_agent_build", "Version of the running agent")
        info.add_metric([], {"version": __version__})
        yield info
        if src.pool is not None:
            yield from _pool_metrics(src.pool)
        if src.hub is not None:
            hub = _safe("hub", src.hub)
            if hub is not None:
                yield GaugeMetricFamily(
                    "edge_agent_sync_configured", "1 when a hub is configured", value=int(hub.configured)
                )
                yield GaugeMetricFamily(
                    "edge_agent_sync_connected", "1 while connected to the hub", value=int(hub.connected)
                )
                if hub.last_sync is not None:
                    yield GaugeMetricFamily(
                        "edge_agent_sync_last_success_timestamp_seconds",
                        "Unix time of the last successful sync round",
                        value=hub.last_sync,
                    )
                yield from _transfer_metrics(hub)
        backlog = self._metrics.snapshot.audit_backlog
        if src.audit_backlog is not None and backlog is not None:
            yield GaugeMetricFamily(
                "edge_agent_audit_backlog_records", "Audit records not yet uploaded to the hub", value=backlog
            )
        if src.policy_version is not None:
            version = _safe("policy_version", src.policy_version)
            if version is not None:
                policy = InfoMetricFamily("edge_agent_policy", "Access policy in force")
                policy.add_metric([], {"version": str(version)})
                yield policy
        if src.scheduler is not None:
            yield from _job_metrics(src.scheduler)
        if src.watchdog is not None:
            yield GaugeMetricFamily(
                "edge_agent_event_loop_lag_seconds",
                "How late the event loop ran the last watchdog tick",
                value=src.watchdog.lag_s,
            )
            yield GaugeMetricFamily(
                "edge_agent_watchdog_interval_seconds",
                "Seconds between WATCHDOG=1 pings",
                value=src.watchdog.interval,
            )


def _pool_metrics(pool: ModelPool) -> Iterator[Metric]:
    rows = pool.status()
    loaded = GaugeMetricFamily(
        "edge_agent_model_loaded", "1 when the model is loaded and ready", labels=["model"]
    )
    state = GaugeMetricFamily(
        "edge_agent_model_state", "Model state (1 for the current one)", labels=["model", "state"]
    )
    memory = GaugeMetricFamily(
        "edge_agent_model_memory_bytes", "Estimated memory of each loaded model", labels=["model"]
    )
    queue = GaugeMetricFamily(
        "edge_agent_queue_depth", "Requests waiting or running, by model", labels=["model"]
    )
    default = GaugeMetricFamily(
        "edge_agent_model_default", "1 for the default (selected) model", labels=["model"]
    )
    for row in rows:
        key = [row.id] if row.state != "retiring" else [f"{row.id} (retiring)"]
        loaded.add_metric(key, int(row.state == "ready"))
        state.add_metric([*key, row.state], 1)
        memory.add_metric(key, row.memory_bytes)
        queue.add_metric(key, row.queue_depth)
        default.add_metric(key, int(row.default))
    yield from (loaded, state, memory, queue, default)
    yield GaugeMetricFamily(
        "edge_agent_pool_memory_used_bytes", "Estimated memory of loaded models", value=pool.memory_used()
    )
    if pool.memory_budget is not None:
        yield GaugeMetricFamily(
            "edge_agent_pool_memory_budget_bytes",
            "Memory the loaded models may use",
            value=pool.memory_budget,
        )
    # Every outcome is present from the start, at zero, so rates work from the first scrape.
    swaps = CounterMetricFamily(
        "edge_agent_selection_changes", "Hot swaps of the default model, by outcome", labels=["outcome"]
    )
    for outcome in ("ok", "load_failed", "smoke_failed", "over_budget"):
        swaps.add_metric([outcome], pool.swaps.get(outcome, 0))
    yield swaps
    yield CounterMetricFamily(
        "edge_agent_cold_swaps",
        "Swaps (of any outcome) that unloaded the default first because both models did not fit",
        value=pool.swaps.get("cold", 0),
    )


def _job_metrics(scheduler: Jobs) -> Iterator[Metric]:
    runs = CounterMetricFamily("edge_agent_job_runs", "Runs of each periodic job", labels=["job"])
    failures = CounterMetricFamily(
        "edge_agent_job_failures", "Failed runs of each periodic job", labels=["job"]
    )
    for job in scheduler.jobs():
        runs.add_metric([job.name], job.runs)
        failures.add_metric([job.name], job.failures)
    yield runs
    yield failures


__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "HubState",
    "Jobs",
    "Metrics",
    "Snapshot",
    "StatusSources",
    "WatchdogView",
]
