"""kill -9 a real daemon under concurrent clients, repeatedly, at random moments (each once the
round's first request completed, so every round has served something, however loaded the box).

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
FIRST_COMPLETION_S = 300.0
"""How long a round waits for its first completed request: a few seconds on an idle box, many
times that on a loaded one (three clients share two cores with whatever else runs)."""


def client_loop(
    socket: Path, stream: bool, stop: threading.Event, completed: list[str], lock: threading.Lock
) -> None:
    body = {"prompt": "Count: one, two,", "max_tokens": 3, "temperature": 0, "stream": stream}
    with uds_client(socket, timeout=120) as c:  # a request is slow on a loaded box; a kill ends it at once
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


def wait_for_completion(
    completed: list[str], lock: threading.Lock, threads: list[threading.Thread], what: str
) -> None:
    """Until a client has completed a request (not a fixed sleep: under load the first one may take
    longer than the whole sleep did, and a round that served nothing proves nothing)."""
    deadline = time.monotonic() + FIRST_COMPLETION_S
    while True:
        with lock:
            if completed:
                return
        if not any(t.is_alive() for t in threads):
            raise AssertionError(f"{what}: every client stopped before one request completed")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: no request completed within {FIRST_COMPLETION_S:g} s")
        time.sleep(0.05)


def test_kill9_under_load_loses_no_completed_request(tmp_path: Path, gemma_path: Path) -> None:
    rng = random.Random(20261129)
    state = tmp_path / "state"
    all_completed: list[str] = []
    for round_ in range(ROUNDS):
        completed: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()
        # one engine thread: two spin at llama.cpp's barriers when the cores are busy (under two CPU
        # hogs a 3-token completion took 4.3-7.9 s with two, 0.5-1.0 s with one)
        env = {"EDGE_AGENT_ENGINE__N_THREADS": "1", "EDGE_AGENT_AUDIT__CHECKPOINT_EVERY": "3"}
        with running_daemon(state, gemma_path, env=env) as d:  # checkpoints get killed mid-way too
            threads = [
                threading.Thread(target=client_loop, args=(d.socket, i % 2 == 1, stop, completed, lock))
                for i in range(CLIENTS)
            ]
            for t in threads:
                t.start()
            wait_for_completion(completed, lock, threads, f"round {round_}")
            time.sleep(rng.uniform(0.0, 5.0))  # then a random moment: more complete, others are in flight
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
