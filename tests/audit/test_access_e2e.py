"""A real daemon, real Unix users: a process of a second user is refused, a permitted one served.

The test creates two users with ``useradd`` (it runs as root), starts the daemon with an inline
policy (the ``ea-clients`` group may infer on ``gemma-*`` within role limits), and runs a
stdlib-only HTTP client as each user with ``subprocess.run(user=...)``. The daemon identifies
them by SO_PEERCRED alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.audit.store import AuditLog, audit_path
from fleet.device_key import ensure_device_key
from tests.daemon import running_daemon

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None, reason="needs root and useradd"),
]

GROUP = "ea-clients"
PERMITTED = "ea-permit"
DENIED = "ea-deny"
PYTHON = "/usr/bin/python3"

CLIENT = r"""
import json, socket, sys
path, requests = sys.argv[1], json.loads(sys.argv[2])
out = []
for method, target, body in requests:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(head.encode() + b"\r\n" + data)
    raw = b""
    while chunk := s.recv(65536):
        raw += chunk
    s.close()
    header, _, payload = raw.partition(b"\r\n\r\n")
    lines = header.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    status = int(lines[0].split()[1])
    out.append({"status": status, "headers": headers, "body": json.loads(payload or b"null")})
print(json.dumps(out))
"""

RPM = 2
"""The app role's rate: a burst of 2, then a new token every 30 s. The completion takes a token at
its admission and the listings follow its generation, so they see the limit only while that
generation lasts less than 60 / RPM s. At a rate of 4 (15 s) a loaded box (load average 5-15 on 2
cores) sometimes took longer, and the listing meant to be refused got a new token."""

POLICY_ROLES = {
    "admin": {"permissions": [{"actions": ["admin"]}]},
    "app": {
        "permissions": [
            {"actions": ["infer"], "models": ["gemma-*"]},
            {"actions": ["models.list", "status"]},
        ],
        "limits": {"max_tokens": 8, "requests_per_minute": RPM},
    },
}
POLICY_BINDINGS = [{"role": "admin", "uids": [0]}, {"role": "app", "groups": [GROUP]}]


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, int]]:
    created: list[str] = []
    try:
        if subprocess.run(["getent", "group", GROUP], capture_output=True).returncode != 0:
            _run("groupadd", GROUP)
            created.append("group")
        for name, extra in ((PERMITTED, ["-g", GROUP]), (DENIED, ["-U"])):
            if subprocess.run(["id", name], capture_output=True).returncode != 0:
                _run("useradd", "-M", "-s", "/usr/sbin/nologin", *extra, name)
                created.append(name)
        yield {
            n: int(subprocess.run(["id", "-u", n], capture_output=True, text=True).stdout)
            for n in (PERMITTED, DENIED)
        }
    finally:
        for name in (PERMITTED, DENIED):
            if name in created:
                subprocess.run(["userdel", name], capture_output=True)
        if "group" in created:
            subprocess.run(["groupdel", GROUP], capture_output=True)


def as_user(user: str, socket_path: Path, requests: list[tuple[str, str, Any]]) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [PYTHON, "-c", CLIENT, str(socket_path), json.dumps(requests)],
        user=user,
        group=GROUP if user == PERMITTED else user,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    result: list[dict[str, Any]] = json.loads(proc.stdout)
    return result


def completion(max_tokens: int) -> tuple[str, str, Any]:
    return ("POST", "/v1/completions", {"prompt": "The sky is", "max_tokens": max_tokens, "temperature": 0})


def test_second_user_refused_permitted_user_served_within_limits(
    tmp_path: Path, gemma_path: Path, users: dict[str, int]
) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="ea-sock-"))
    run_dir.chmod(0o755)  # the test's tmp_path is private to root; the socket must be reachable
    socket_path = run_dir / "agent.sock"
    env = {
        "EDGE_AGENT_SERVER__SOCKET_PATH": str(socket_path),
        "EDGE_AGENT_SERVER__SOCKET_MODE": "0666",  # both may connect: the policy decides
        # one thread: two spin at llama.cpp's barriers when the cores are busy (a 4-token completion
        # took 2.4-6.3 s under two CPU hogs, 0.25-0.44 s with one)
        "EDGE_AGENT_ENGINE__N_THREADS": "1",
        "EDGE_AGENT_ACCESS__ROLES": json.dumps(POLICY_ROLES),
        "EDGE_AGENT_ACCESS__BINDINGS": json.dumps(POLICY_BINDINGS),
    }
    state = tmp_path / "state"
    try:
        with running_daemon(state, gemma_path, env=env, wait=False) as d:
            d.socket = socket_path
            d.wait_ready()
            denied = as_user(DENIED, socket_path, [completion(4), ("GET", "/v1/models", None)])
            permitted = as_user(
                PERMITTED,
                socket_path,
                [
                    completion(4),
                    completion(50),
                    ("POST", "/admin/reload", {}),
                    *[("GET", "/v1/models", None)] * 5,
                ],
            )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    for response in denied:
        assert response["status"] == 403
        assert response["body"]["error"]["code"] == "forbidden"
        assert f"no role is bound to user {DENIED}" in response["body"]["error"]["message"]
    assert "infer on model 'gemma-3-270m-q4_k_m'" in denied[0]["body"]["error"]["message"]
    assert "'models.list'" in denied[1]["body"]["error"]["message"]

    served, too_many_tokens, admin, *listing = permitted
    assert served["status"] == 200 and served["body"]["usage"]["completion_tokens"] == 4
    assert too_many_tokens["status"] == 400
    assert "max_tokens 50 exceeds the limit 8" in too_many_tokens["body"]["error"]["message"]
    assert admin["status"] == 403 and "'models.admin'" in admin["body"]["error"]["message"]
    statuses = [r["status"] for r in listing]
    assert statuses[:1] == [200]  # 2 per minute: the completion took one, the two refusals none
    assert statuses[1:] == [429, 429, 429, 429]
    assert int(listing[1]["headers"]["retry-after"]) >= 1

    log = AuditLog(audit_path(state))
    records = [s.record() for s in log.iter_records()]
    by_uid = {uid: [r for r in records if r["actor"].get("uid") == uid] for uid in users.values()}
    refused = by_uid[users[DENIED]]
    assert [(r["action"], r["outcome"]) for r in refused] == [("infer", "denied"), ("models.list", "denied")]
    assert refused[0]["actor"]["user"] == DENIED and refused[0]["resource"] == "gemma-3-270m-q4_k_m"
    mine = [(r["action"], r["outcome"], r["details"]["status"]) for r in by_uid[users[PERMITTED]]]
    assert mine == [
        ("infer", "ok", 200),
        ("infer", "refused", 400),
        ("models.admin", "denied", 403),
        *[("models.list", "refused", 429)] * 4,
    ]  # allowed reads are not recorded unless [audit] audit_reads
    ok = by_uid[users[PERMITTED]][0]
    assert ok["actor"]["role"] == "app" and ok["details"]["completion_tokens"] == 4
    assert ok["details"]["model"] == "gemma-3-270m-q4_k_m"
    assert log.verify([ensure_device_key(state).public]).ok
