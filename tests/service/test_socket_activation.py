"""Socket activation: the test binds the socket and hands it over as fd 3, as systemd does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from agent.server.listener import bind_unix
from tests.daemon import uds_client
from tests.service.conftest import NotifyListener


def test_daemon_serves_on_the_inherited_socket(tmp_path: Path, notify_listener: NotifyListener) -> None:
    path = tmp_path / "activated.sock"
    listening = bind_unix(path, 0o660)
    fd = listening.fileno()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env.update(
        {
            "EDGE_AGENT_STATE_DIR": str(tmp_path / "state"),
            "EDGE_AGENT_LOG__FORMAT": "json",
            "NOTIFY_SOCKET": str(notify_listener.path),
        }
    )
    # What systemd does after fork: the socket at fd 3, LISTEN_PID = the pid that exec keeps.
    script = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        f"os.close({fd})\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='edge-agent.socket')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'agent.cli', 'run'])\n"
    )
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], pass_fds=(fd,), env=env, stdout=log, stderr=subprocess.STDOUT
    )
    listening.close()  # only the daemon holds it now
    try:
        notify_listener.wait_for("READY", "1")
        deadline = time.monotonic() + 30
        while True:
            try:
                with uds_client(path, timeout=5) as c:
                    health = c.get("/health").json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
                time.sleep(0.1)
        assert health["status"] == "no_model"
        # The daemon did not create its own socket under state_dir.
        assert not (tmp_path / "state" / "run" / "edge-agent.sock").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        # The inherited socket file belongs to systemd (RemoveOnStop=): the daemon leaves it.
        assert path.exists()
        lines = (tmp_path / "daemon.log").read_text()
        assert '"socket": "systemd socket"' in lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_listen_pid_of_another_process_is_ignored() -> None:
    from agent.server.listener import systemd_socket

    other = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1"}
    assert systemd_socket(other) is None
