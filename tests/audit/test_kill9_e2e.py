"""kill -9 a real daemon under concurrent clients, repeatedly, at random moments.

After every kill `edge-agent audit verify` passes, and every request that completed at a client
(a plain body read whole; a stream as soon as its ``data: [DONE]`` arrives) has its record.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from agent.audit.store import AuditLog, audit_path
from tests.daemon import running_daemon, uds_client

pytestmark = [pytest.mark.model, pytest.mark.slow]

ROUNDS = 4
CLIENTS = 3


def client_loop(
    socket: Path, stream: bool, stop: threading.Event, completed: list[str], lock: threading.Lock
) -> None:
    body = {"prompt": "Count: one, two,", "max_tokens": 3, "temperature": 0, "stream": stream}
    with uds_client(socket, timeout=30) as c:
        while not stop.is_set():
            rid = uuid.uuid4().hex
            try:
                if stream:
                    ok = False
                    with c.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": rid}) as r:
                        for line in r.iter_lines():
                            if line == "data: [DONE]":  # the strictest client: done at [DONE]
                                ok = r.status_code == 200
                                break
                else:
                    r = c.post("/v1/completions", json=body, headers={"X-Request-Id": rid})
                    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
            except (httpx.HTTPError, OSError, json.JSONDecodeError):
                return  # the daemon is gone
            if ok:
                with lock:
                    completed.append(rid)


def test_kill9_under_load_loses_no_completed_request(tmp_path: Path, gemma_path: Path) -> None:
    rng = random.Random(20261129)
    state = tmp_path / "state"
    all_completed: list[str] = []
    for round_ in range(ROUNDS):
        completed: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()
        env = {"EDGE_AGENT_ENGINE__N_THREADS": "2", "EDGE_AGENT_AUDIT__CHECKPOINT_EVERY": "3"}
        with running_daemon(state, gemma_path, env=env) as d:  # checkpoints get killed mid-way too
            threads = [
                threading.Thread(target=client_loop, args=(d.socket, i % 2 == 1, stop, completed, lock))
                for i in range(CLIENTS)
            ]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(3.0, 8.0))  # a few requests complete, others are in flight
            d.proc.kill()  # SIGKILL: no shutdown path runs
            d.proc.wait(timeout=30)
            stop.set()
            for t in threads:
                t.join(timeout=60)
        verify = subprocess.run(
            [sys.executable, "-m", "agent.cli", "--state-dir", str(state), "audit", "verify"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert verify.returncode == 0, f"round {round_}: {verify.stderr}"
        all_completed.extend(completed)
        recorded = {
            r["details"].get("request_id")
            for r in (s.record() for s in AuditLog(audit_path(state)).iter_records())
            if r["action"] == "infer" and r["outcome"] == "ok"
        }
        missing = [rid for rid in all_completed if rid not in recorded]
        assert not missing, f"round {round_}: {len(missing)} completed requests have no record"
    assert len(all_completed) >= ROUNDS  # the clients really were served between kills
    assert AuditLog(audit_path(state)).checkpoints()  # and signed checkpoints were verified
