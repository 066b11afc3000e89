"""A real daemon reloads its config file and its model store on SIGHUP and ``POST /admin/reload``.

Real parts: the daemon subprocess, its config file (``$EDGE_AGENT_CONFIG``), Unix users made
with ``useradd`` calling over SO_PEERCRED (the helpers of the access tests), Gemma 3 270M, a
signed store filled by ``edge-agent registry import``, the audit log, a notify socket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from agent.audit.store import AuditLog, audit_path
from fleet.device_key import ensure_device_key
from tests.audit.test_access_e2e import DENIED, GROUP, as_user, users  # noqa: F401
from tests.daemon import Daemon, running_daemon, uds_client
from tests.service.conftest import NotifyListener

pytestmark = pytest.mark.model

ROLES = f"""
[access.roles.admin]
permissions = [{{ actions = ["admin"] }}]
[access.roles.app]
permissions = [{{ actions = ["infer"], models = ["gemma-*"] }}, {{ actions = ["models.list", "status"] }}]
[[access.bindings]]
role = "admin"
uids = [0]
[[access.bindings]]
role = "app"
groups = ["{GROUP}"]
"""
SECOND_USER = f"""
[[access.bindings]]
role = "app"
users = ["{DENIED}"]
"""


def wait_event(daemon: Daemon, event: str, count: int = 1, timeout: float = 60.0) -> dict[str, Any]:
    """The ``count``-th log line of ``event``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hits = [line for line in daemon.log_lines() if line.get("event") == event]
        if len(hits) >= count:
            return hits[count - 1]
        time.sleep(0.05)
    raise TimeoutError(f"no {count}x {event} within {timeout}s: {daemon.log_path.read_text()[-3000:]}")


def models_list() -> tuple[str, str, Any]:
    return ("GET", "/v1/models", None)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None, reason="needs root and useradd")
def test_sighup_applies_a_new_binding_keeps_streams_and_refuses_a_bad_config(
    tmp_path: Path,
    gemma_path: Path,
    users: dict[str, int],  # noqa: F811
    notify_listener: NotifyListener,
) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="ea-reload-"))
    run_dir.chmod(0o755)
    socket_path = run_dir / "agent.sock"
    config = tmp_path / "config.toml"
    config.write_text(ROLES)
    env = {
        "EDGE_AGENT_CONFIG": str(config),
        "EDGE_AGENT_SERVER__SOCKET_PATH": str(socket_path),
        "EDGE_AGENT_SERVER__SOCKET_MODE": "0666",
        "EDGE_AGENT_ENGINE__N_THREADS": "2",
        "NOTIFY_SOCKET": str(notify_listener.path),
    }
    state = tmp_path / "state"
    try:
        with running_daemon(state, gemma_path, env=env, wait=False) as d:
            d.socket = socket_path
            d.wait_ready()
            before = as_user(DENIED, socket_path, [models_list()])

            # A stream in flight while the config changes and SIGHUP arrives.
            body = {"prompt": "Once upon a time", "max_tokens": 96, "temperature": 0, "stream": True}
            chunks: list[dict[str, Any]] = []
            done = False
            with uds_client(socket_path) as client, client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunks.append(json.loads(line[6:]))
                    if len(chunks) == 1:
                        config.write_text(ROLES + SECOND_USER)
                        d.proc.send_signal(signal.SIGHUP)
                        applied = wait_event(d, "reloaded")
            after = as_user(DENIED, socket_path, [models_list()])

            config.write_text(ROLES + SECOND_USER + "[pool]\nkeep_alive = 3\n")  # a typo
            d.proc.send_signal(signal.SIGHUP)
            refused = wait_event(d, "reload_refused")
            still = as_user(DENIED, socket_path, [models_list()])
            with uds_client(socket_path, timeout=30) as client:
                bad = client.post("/admin/reload")
                config.write_text(ROLES + SECOND_USER + "[server]\nkeepalive_timeout_s = 30.0\n")
                good = client.post("/admin/reload")
            reloading = notify_listener.with_key("RELOADING")
            ready = notify_listener.wait_for("READY", "1", count=5)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)

    assert before[0]["status"] == 403
    assert done and chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    assert applied["changed"] == ["access.bindings"] and applied["restart_needed"] == []
    assert after[0]["status"] == 200  # the new binding took effect without a restart
    assert (
        "access.bindings" not in refused["error"]
        and "pool.keep_alive = 3: unknown setting" in refused["error"]
    )
    assert still[0]["status"] == 200  # the running settings stayed
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "config_error"
    assert "pool.keep_alive" in bad.json()["error"]["message"]
    report = good.json()
    assert good.status_code == 200, report
    assert report["restart_needed"] == ["server.keepalive_timeout_s"] and report["applied"] == []
    assert report["policy"]["source"] == "config [access]"
    assert len(reloading) == 4 and all(m.get("MONOTONIC_USEC") for m in reloading)
    assert ready.at >= reloading[-1].at

    log = AuditLog(audit_path(state))
    records = [s.record() for s in log.iter_records()]
    reloads = [r for r in records if r["action"] == "config.reload"]
    assert [r["outcome"] for r in reloads] == ["ok", "refused", "refused", "ok"]
    assert reloads[0]["details"]["changed"] == ["access.bindings"]
    assert [r["details"]["trigger"] for r in reloads] == ["SIGHUP", "SIGHUP", "api", "api"]
    changes = [r for r in records if r["action"] == "policy.change"]
    assert len(changes) == 1 and changes[0]["resource"] == "config [access]"
    streamed = [r for r in records if r["action"] == "infer" and r["actor"].get("uid") == 0]
    started = [r for r in streamed if r["outcome"] == "started"]  # durable before its first byte
    done = [r for r in streamed if r["outcome"] != "started"]
    assert started and started[0]["seq"] < reloads[0]["seq"]  # the stream began before the reload
    assert done[0]["seq"] > reloads[0]["seq"]  # and completed after it
    assert log.verify([ensure_device_key(state).public]).ok


def _cli(state: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--state-dir", str(state), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _complete(socket_path: Path, model: str, timeout: float = 120.0) -> Any:
    """A completion from ``model``, waiting while it loads (503); any other answer is returned."""
    deadline = time.monotonic() + timeout
    with uds_client(socket_path) as client:
        while True:
            r = client.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
            if r.status_code != 503 or time.monotonic() > deadline:
                return r
            time.sleep(0.2)


def test_models_imported_or_removed_while_running_follow_a_reload(tmp_path: Path, gemma_path: Path) -> None:
    from registry.device import DeviceRegistry
    from registry.publish import add_model, set_deployment
    from registry.repository import Repository

    state = tmp_path / "state"
    repo = Repository.init(tmp_path / "hub" / "repo")
    add_model(repo, gemma_path, model_id="gemma-a", task="completion", licence="gemma")
    set_deployment(repo, "lab", "gemma-a", pin=True)
    device = DeviceRegistry(state)
    device.enroll((repo.path / "metadata" / "1.root.json").read_bytes(), "box-1", ("lab",))
    device.import_bundle(repo.export_bundle(tmp_path / "bundle-1"))

    with running_daemon(state, None, env={"EDGE_AGENT_ENGINE__N_THREADS": "2"}) as d:
        assert d.health()["default_model"] == "gemma-a"
        add_model(repo, gemma_path, model_id="gemma-b", task="completion", licence="gemma")
        set_deployment(repo, "lab", "gemma-b")
        imported = _cli(state, "registry", "import", str(repo.export_bundle(tmp_path / "bundle-2")))
        unknown = _complete(d.socket, "gemma-b")
        with uds_client(d.socket) as client:
            report = client.post("/admin/reload").json()
        served = _complete(d.socket, "gemma-b")

        _cli(state, "registry", "remove", "gemma-b")
        d.proc.send_signal(signal.SIGHUP)
        removed = wait_event(d, "reloaded", count=2)  # the first was the API's
        gone = _complete(d.socket, "gemma-b")
        default = _complete(d.socket, "gemma-a")

        (state / "registry" / "installed.json").write_text("not json")  # the store breaks
        with uds_client(d.socket) as client:
            broken = client.post("/admin/reload")
        still = _complete(d.socket, "gemma-a")

    assert "1 installed" in imported
    assert unknown.status_code == 404
    assert report["models_added"] == ["gemma-b"] and report["models_removed"] == []
    assert served.status_code == 200 and served.json()["model"] == "gemma-b"
    assert removed["models_removed"] == ["gemma-b"]
    assert gone.status_code == 404
    assert default.status_code == 200
    assert broken.status_code == 500, broken.text  # not a config error: not 400
    error = broken.json()["error"]
    assert error["code"] == "store_reload_failed" and "installed index is corrupt" in error["message"]
    assert still.status_code == 200
