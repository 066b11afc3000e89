"""A model that kills the daemon's process does not take the box down (real daemon, real model).

- kill -9 while the daemon activates a model (held in its load by a test-only fault): at the next
  start the half-activated model is skipped, named in ``/admin/status`` (``daemon_died``), audited,
  and never loaded again until the operator says ``edge-agent registry retry``;
- a model whose trial dies by SIGILL at start: the daemon stays up, says why, and the refusal holds
  across a restart without a second trial.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.audit.store import AuditLog, audit_path
from agent.engine.isolation import FAULT_ENV
from tests.daemon import running_daemon, uds_client

pytestmark = [pytest.mark.model, pytest.mark.slow]
MODEL = "gemma-3-270m-q4_k_m"


def _status(socket: Path) -> dict[str, Any]:
    with uds_client(socket, timeout=10) as c:
        body: dict[str, Any] = c.get("/admin/status").json()
        return body


def _events(state: Path, name: str) -> list[str]:
    return [line["event"] for line in _log(state) if line.get("event") == name]


def _log(state: Path) -> list[dict[str, Any]]:
    out = []
    for line in (state / "daemon.log").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _audited_refusals(state: Path) -> list[tuple[str | None, str]]:
    records = [s.record() for s in AuditLog(audit_path(state)).iter_records()]
    return [(r["resource"], r["reason"]) for r in records if r["action"] == "model.refused"]


def test_kill9_during_activation_skips_that_model_at_the_next_start(tmp_path: Path, gemma_path: Path) -> None:
    state = tmp_path / "state"
    markers = state / "isolation" / "activating"
    with running_daemon(state, gemma_path, env={FAULT_ENV: f"activate:{MODEL}:hang"}, wait=False) as d:
        deadline = time.monotonic() + 120
        while not list(markers.glob("*.json")):
            assert d.proc.poll() is None, (state / "daemon.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the daemon never started activating the model"
            time.sleep(0.1)
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
    (state / "daemon.log").rename(state / "first.log")

    with running_daemon(state, gemma_path, wait=False) as d:
        d.wait_ready(status="failed")  # up, answering, and saying why it serves nothing
        status = _status(d.socket)
        [refused] = status["refused"]
        assert (refused["model"], refused["reason"]) == (MODEL, "daemon_died")
        assert "died while activating" in refused["detail"]
        [row] = status["models"]
        assert row["state"] == "failed" and "daemon_died" in row["error"]
        with uds_client(d.socket, timeout=10) as c:
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code >= 500 and "daemon_died" in r.text
    assert not list(markers.glob("*.json"))
    assert _events(state, "model_trial") == []  # not tried, not loaded: skipped
    assert _audited_refusals(state) == [(MODEL, "daemon_died")]

    listed = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--state-dir", str(state), "registry", "retry", MODEL],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "forgot 1 refusal" in listed.stdout
    with running_daemon(state, gemma_path) as d:  # tried again, and it runs
        assert _status(d.socket)["refused"] == []


def test_a_model_whose_trial_crashes_at_start_is_refused_and_the_daemon_stays_up(
    tmp_path: Path, gemma_path: Path
) -> None:
    state = tmp_path / "state"
    with running_daemon(state, gemma_path, env={FAULT_ENV: f"trial:{MODEL}:sigill"}, wait=False) as d:
        d.wait_ready(status="failed")
        [refused] = _status(d.socket)["refused"]
        assert (refused["model"], refused["reason"]) == (MODEL, "SIGILL")
        assert d.proc.poll() is None
    assert _events(state, "model_trial") == ["model_trial"]
    (state / "daemon.log").rename(state / "first.log")
    with running_daemon(state, gemma_path, wait=False) as d:  # no fault now: the verdict holds
        d.wait_ready(status="failed")
        assert [r["reason"] for r in _status(d.socket)["refused"]] == ["SIGILL"]
    assert _events(state, "model_trial") == []
    assert _audited_refusals(state) == [(MODEL, "SIGILL")]
