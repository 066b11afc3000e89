"""GET /metrics and /admin/status of the real daemon, parsed with prometheus_client's parser."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import Daemon, running_daemon, uds_client

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m-q4_k_m"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Daemon]:
    with running_daemon(tmp_path_factory.mktemp("metrics"), gemma_path) as d:
        with uds_client(d.socket) as c:
            r = c.post(
                "/v1/completions", json={"prompt": "Edge computing is", "max_tokens": 5, "temperature": 0}
            )
            assert r.status_code == 200
            usages = [r.json()["usage"]]
            body = {
                "prompt": "Hello",
                "max_tokens": 3,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with c.stream("POST", "/v1/completions", json=body) as s:
                assert s.status_code == 200
                for line in s.iter_lines():
                    data = line.removeprefix("data: ")
                    if line.startswith("data: ") and data != "[DONE]" and json.loads(data).get("usage"):
                        usages.append(json.loads(data)["usage"])
            assert len(usages) == 2
            d.expected_tokens = {  # type: ignore[attr-defined]
                "in": sum(u["prompt_tokens"] for u in usages),
                "out": sum(u["completion_tokens"] for u in usages),
            }
            assert c.post("/v1/completions", json={"prompt": "x", "model": "nope"}).status_code == 404
            assert c.get("/no/such/path").status_code == 404
        yield d


def _samples(daemon: Daemon) -> dict[str, list[tuple[dict[str, str], float]]]:
    with uds_client(daemon.socket) as c:
        r = c.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def _value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    hits = [v for lab, v in samples.get(name, []) if all(lab.get(k) == w for k, w in labels.items())]
    assert hits, f"no {name}{labels} in {sorted(samples)}"
    return sum(hits)


def test_request_counts_latency_and_tokens(served: Daemon) -> None:
    m = _samples(served)
    assert _value(m, "edge_agent_requests_total", route="/v1/completions", status="200", model=MODEL) == 2
    assert _value(m, "edge_agent_requests_total", route="/v1/completions", status="404") == 1
    assert _value(m, "edge_agent_requests_total", route="other", status="404") == 1  # raw path not a label
    assert not any("/no/such/path" in str(lab) for lab, _ in m["edge_agent_requests_total"])
    count = _value(m, "edge_agent_request_duration_seconds_count", route="/v1/completions", model=MODEL)
    inf = _value(
        m, "edge_agent_request_duration_seconds_bucket", route="/v1/completions", model=MODEL, le="+Inf"
    )
    assert count == inf == 2
    assert _value(m, "edge_agent_request_duration_seconds_sum", route="/v1/completions", model=MODEL) > 0
    # Tokens of the plain and the streamed completion, as their responses reported them.
    expected = served.expected_tokens  # type: ignore[attr-defined]
    assert _value(m, "edge_agent_tokens_total", model=MODEL, direction="out") == expected["out"]
    assert _value(m, "edge_agent_tokens_total", model=MODEL, direction="in") == expected["in"]


def test_state_series(served: Daemon) -> None:
    m = _samples(served)
    assert _value(m, "edge_agent_model_loaded", model=MODEL) == 1
    assert _value(m, "edge_agent_model_default", model=MODEL) == 1
    assert _value(m, "edge_agent_model_memory_bytes", model=MODEL) > 100 << 20
    assert _value(m, "edge_agent_queue_depth", model=MODEL) == 0
    assert (
        _value(m, "edge_agent_pool_memory_budget_bytes") > _value(m, "edge_agent_pool_memory_used_bytes") > 0
    )
    for outcome in ("ok", "load_failed", "smoke_failed", "over_budget"):
        assert _value(m, "edge_agent_selection_changes_total", outcome=outcome) == 0
    assert _value(m, "edge_agent_cold_swaps_total") == 0
    assert _value(m, "edge_agent_sync_configured") == 0
    assert _value(m, "edge_agent_audit_backlog_records") >= 1  # at least the config.load record
    assert _value(m, "edge_agent_process_resident_memory_bytes") > 0
    assert _value(m, "edge_agent_build_info", version=served.health()["version"]) == 1
    assert _value(m, "edge_agent_job_runs_total", job="idle_unload") >= 0
    assert _value(m, "edge_agent_requests_in_flight") == 1  # this scrape


def test_admin_status_has_what_an_operator_needs(served: Daemon) -> None:
    with uds_client(served.socket) as c:
        body = c.get("/admin/status").json()
    assert body["default_model"] == MODEL
    (model,) = body["models"]
    assert (model["id"], model["state"], model["default"]) == (MODEL, "ready", True)
    assert model["memory_bytes"] > 0 and model["queue_depth"] == 0
    assert body["memory"]["used_bytes"] == model["memory_bytes"]
    assert body["memory"]["budget_bytes"] > body["memory"]["used_bytes"]
    assert body["process"]["rss_bytes"] > 0 and body["process"]["pid"] == served.proc.pid
    assert body["hub"] == {
        "configured": False,
        "connected": False,
        "last_sync": None,
        "hub_online": None,
        "transfers": None,
    }
    assert body["policy_version"] is not None
    assert isinstance(body["audit_backlog"], int)
    jobs = {j["name"]: j for j in body["jobs"]}
    assert {"idle_unload", "reprobe"} <= set(jobs)
    assert all(j["next_run"] is not None for j in jobs.values())


def _cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "--state-dir", str(daemon.state_dir), "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "160", "HOME": str(daemon.state_dir)},
    )


def test_status_command_json_and_table(served: Daemon) -> None:
    result = _cli(served, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["status"]["default_model"] == MODEL and data["health"]["status"] == "ok"
    table = _cli(served)
    assert table.returncode == 0, table.stderr
    for needle in (MODEL, "ready", "default", "memory", "queue", "hub", "policy", "audit backlog"):
        assert needle in table.stdout, (needle, table.stdout)


def test_status_command_without_daemon_fails_cleanly(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--state-dir", str(tmp_path), "status"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot connect" in result.stderr and "Traceback" not in result.stderr
