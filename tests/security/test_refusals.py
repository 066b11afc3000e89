"""Refused requests cannot take the API down (issue 15, medium #5).

Before: every denial was written and fsynced before any rate limit, so a caller with no role
looping on ``GET /admin/audit`` filled the log, and in ``fail_closed`` mode everyone got 503. Now a
caller's refusals are recorded at most ``refusals_per_minute`` a minute (beyond: 429 and counted
onto its next record), and refusals never take more than half of the log: allowed requests keep
their room. Through the real daemon, with the denied caller a real other Unix user (``nobody``).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.audit.store import SHED_AT, AuditLog, audit_path
from fleet.chain import Entry
from tests.daemon import Daemon, accepts, running_daemon, uds_client

LOOP = """
import http.client, json, socket, sys

class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sys.argv[1])

client = Unix("localhost", timeout=30)
codes = {}
for i in range(int(sys.argv[2])):
    client.request("GET", "/admin/audit")
    r = client.getresponse()
    r.read()
    codes[str(r.status)] = codes.get(str(r.status), 0) + 1
print(json.dumps(codes))
"""


def as_nobody(socket: Path, n: int) -> dict[str, int]:
    out = subprocess.run(
        ["/usr/bin/python3", "-c", LOOP, str(socket), str(n)],  # the system's: stdlib only
        user="nobody",
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    codes: dict[str, int] = json.loads(out.stdout)
    return codes


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the denied caller as another user")
    public = Path(tempfile.mkdtemp(prefix="edge-refusals-", dir="/tmp"))
    public.chmod(0o755)
    policy = tmp_path / "policy.json"
    admin = {"roles": {"admin": {"permissions": [{"actions": ["admin"]}]}}}
    policy.write_text(json.dumps({"version": 1, **admin, "bindings": [{"role": "admin", "uids": [0]}]}))
    env = {
        "EDGE_AGENT_ACCESS__POLICY_FILE": str(policy),
        "EDGE_AGENT_SERVER__SOCKET_PATH": str(public / "api.sock"),
        "EDGE_AGENT_SERVER__SOCKET_MODE": "0666",
        "EDGE_AGENT_AUDIT__MAX_BYTES": str(1 << 16),  # 64 KiB: a few hundred records fill it
        "EDGE_AGENT_AUDIT__AUDIT_READS": "true",
        "EDGE_AGENT_AUDIT__REFUSALS_PER_MINUTE": "30",
    }
    with running_daemon(tmp_path / "state", None, env=env, wait=False) as d:
        d.socket = public / "api.sock"
        deadline = time.monotonic() + 60
        while not accepts(d.socket):
            assert time.monotonic() < deadline and d.proc.poll() is None, d.log_path.read_text()[-2000:]
            time.sleep(0.1)
        yield d


def records(state: Path) -> list[dict[str, object]]:
    return [s.record() for s in AuditLog(audit_path(state)).iter_records()]


def test_a_denied_caller_looping_cannot_fill_the_log_nor_block_allowed_callers(daemon: Daemon) -> None:
    codes = as_nobody(daemon.socket, 600)  # ~600 x 450 bytes would be 4x the log
    assert codes.get("403", 0) <= 31 and codes.get("429", 0) >= 569, codes
    with uds_client(daemon.socket, timeout=30) as c:
        ok = [c.get("/admin/status").status_code for _ in range(20)]
    assert ok == [200] * 20  # the allowed caller is served and recorded
    denied = [r for r in records(daemon.state_dir) if r["outcome"] == "denied"]
    assert 25 <= len(denied) <= 31
    time.sleep(2.2)  # one token back (30 a minute)
    assert as_nobody(daemon.socket, 1) == {"403": 1}
    last = [r for r in records(daemon.state_dir) if r["outcome"] == "denied"][-1]
    details = last["details"]
    assert isinstance(details, dict) and details["suppressed"] >= 569  # the loop, counted on record


def test_refusals_take_at_most_their_share_of_the_log(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db", max_bytes=1 << 16)
    entry = Entry("admin", None, "denied", "no role", {"uid": 65534}, {"route": "GET /admin/audit"})
    written = [log.submit(entry, shed=True).result() for _ in range(600)]
    stats = log.stats()
    assert stats.used_bytes <= SHED_AT * stats.max_bytes + 1024
    assert written.count(0) > 300  # the rest counted, not written
    log.admit()  # allowed requests are still admitted (fail_closed would raise AuditFull)
    assert log.submit(Entry("infer", "m", "ok", "allowed", {"uid": 0}, {})).result() > 0
    log.close()
