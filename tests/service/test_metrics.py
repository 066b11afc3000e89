"""Metrics without a daemon: fake engines in a real pool, a real registry, the real parser."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.engine.pool import ModelPool
from agent.server.metrics import HubState, Metrics, StatusSources
from agent.sync.fetcher import TransferTotals
from tests.fakes.engine import FakeFactory, fake_info


def parse(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def ready_pool() -> ModelPool:
    async def main() -> ModelPool:
        pool = ModelPool(FakeFactory(), memory_budget=1 << 30)
        pool.register(fake_info("small", 100))
        pool.start_loading()
        await pool.wait_loaded()
        return pool

    return asyncio.run(main())


def test_observations_and_state_series() -> None:
    pool = ready_pool()
    totals = TransferTotals(
        bytes_received=5 << 20, chunks_requested=12, chunks_resumed=3, active=1, reasked=Counter(hub_back=4)
    )
    metrics = Metrics(
        (0.1, 1.0),
        StatusSources(
            pool=pool,
            audit_backlog=lambda: 42,
            policy_version=lambda: 7,
            hub=lambda: HubState(True, True, 1_700_000_000.0, True, totals),
        ),
    )
    metrics.observe_request("/v1/completions", "POST", 200, "small", 0.5, 12, 30)
    metrics.observe_request("/v1/completions", "POST", 200, "small", 2.0, 3, 5)
    metrics.observe_request("/health", "GET", 200, "-", 0.001)
    pool.swaps.update({"ok": 2, "load_failed": 1, "cold": 2})
    asyncio.run(metrics.refresh())
    m = parse(metrics)
    changes = {lab["outcome"]: v for lab, v in m["edge_agent_selection_changes_total"]}
    assert changes == {"ok": 2.0, "load_failed": 1.0, "smoke_failed": 0.0, "over_budget": 0.0}
    assert m["edge_agent_cold_swaps_total"] == [({}, 2.0)]
    assert ({"route": "/v1/completions", "method": "POST", "status": "200", "model": "small"}, 2.0) in m[
        "edge_agent_requests_total"
    ]
    buckets = {
        lab["le"]: v for lab, v in m["edge_agent_request_duration_seconds_bucket"] if lab["model"] == "small"
    }
    assert buckets == {"0.1": 0.0, "1.0": 1.0, "+Inf": 2.0}
    tokens = {lab["direction"]: v for lab, v in m["edge_agent_tokens_total"]}
    assert tokens == {"in": 15.0, "out": 35.0}
    assert m["edge_agent_model_loaded"] == [({"model": "small"}, 1.0)]
    assert m["edge_agent_model_memory_bytes"] == [({"model": "small"}, float(100 << 20))]
    assert m["edge_agent_pool_memory_budget_bytes"] == [({}, float(1 << 30))]
    assert m["edge_agent_audit_backlog_records"] == [({}, 42.0)]
    assert m["edge_agent_policy_info"] == [({"version": "7"}, 1.0)]
    assert m["edge_agent_sync_connected"] == [({}, 1.0)]
    assert m["edge_agent_sync_last_success_timestamp_seconds"] == [({}, 1_700_000_000.0)]
    assert m["edge_agent_sync_hub_online"] == [({}, 1.0)]
    assert m["edge_agent_sync_transfers_active"] == [({}, 1.0)]
    assert m["edge_agent_sync_transfer_bytes_total"] == [({}, float(5 << 20))]
    assert m["edge_agent_sync_chunk_requests_total"] == [({}, 12.0)]
    assert m["edge_agent_sync_chunks_resumed_total"] == [({}, 3.0)]
    reasked = {lab["reason"]: v for lab, v in m["edge_agent_sync_chunks_reasked_total"]}
    assert reasked == {"timeout": 0.0, "reconnect": 0.0, "hub_back": 4.0, "not_found": 0.0}


def _boom() -> Any:
    raise RuntimeError("source down")


@pytest.mark.parametrize(
    ("field", "series"),
    [
        pytest.param("audit_backlog", "edge_agent_audit_backlog_records", id="audit-backlog"),
        pytest.param("policy_version", "edge_agent_policy_info", id="policy-version"),
        pytest.param("hub", "edge_agent_sync_connected", id="hub"),
    ],
)
def test_a_failing_source_is_left_out_not_fatal(field: str, series: str) -> None:
    sources = StatusSources(pool=ready_pool())
    setattr(sources, field, _boom)
    metrics = Metrics(sources=sources)
    asyncio.run(metrics.refresh())
    m = parse(metrics)
    assert series not in m
    assert m["edge_agent_model_loaded"]  # the rest of the scrape is there


def test_metrics_instances_do_not_share_state() -> None:
    a, b = Metrics(), Metrics()
    a.observe_request("/health", "GET", 200, "-", 0.01)
    counts: Callable[[Metrics], list[Any]] = lambda m: parse(m).get("edge_agent_requests_total", [])  # noqa: E731
    assert len(counts(a)) == 1 and counts(b) == []
