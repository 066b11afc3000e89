"""The API socket file (issue 15, low): never chmod/chown through a path another user controls,
never remove what is not our socket, and say so when socket activation overrides the config's
socket_mode/socket_group."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.server.listener import ListenerError, bind_unix, remove_socket_file


@pytest.mark.parametrize(
    ("mode", "owner", "ok"),
    [
        pytest.param(0o777, 0, False, id="world-writable-directory"),
        pytest.param(0o1777, 0, True, id="sticky-world-writable-like-tmp"),
        pytest.param(0o755, 65534, False, id="directory-of-another-user"),
        pytest.param(0o750, 0, True, id="own-directory"),
    ],
)
def test_the_socket_directory_must_not_let_others_swap_the_socket(
    tmp_path: Path, mode: int, owner: int, ok: bool
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the directory another owner")
    d = tmp_path / "run"
    d.mkdir()
    os.chown(d, owner, -1)
    d.chmod(mode)
    if ok:
        bind_unix(d / "api.sock").close()
        assert remove_socket_file(d / "api.sock")
    else:
        with pytest.raises(ListenerError):
            bind_unix(d / "api.sock")


@pytest.mark.parametrize(
    "replacement",
    [
        pytest.param("file", id="a-file-that-took-the-path"),
        pytest.param("symlink", id="a-symlink-to-something-else"),
        pytest.param("socket", id="another-socket-on-the-path"),
    ],
)
def test_stop_removes_only_the_socket_it_bound(tmp_path: Path, replacement: str) -> None:
    path = tmp_path / "api.sock"
    sock = bind_unix(path)
    sock.close()
    path.unlink()
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    if replacement == "file":
        path.write_text("not ours")
    elif replacement == "symlink":
        path.symlink_to(victim)
    else:
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(path))
        other.close()
    assert remove_socket_file(path) is False
    assert path.exists() or path.is_symlink()
    assert victim.read_text() == "keep me"


def test_socket_activation_says_the_config_socket_settings_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "activated.sock"
    listening = bind_unix(path, 0o660)
    fd = listening.fileno()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env.update(
        {
            "EDGE_AGENT_STATE_DIR": str(tmp_path / "state"),
            "EDGE_AGENT_LOG__FORMAT": "json",
            "EDGE_AGENT_SERVER__SOCKET_MODE": "0600",
            "EDGE_AGENT_SERVER__SOCKET_GROUP": "root",
        }
    )
    script = (
        "import os, sys\n"
        f"os.dup2({fd}, 3)\n"
        f"os.close({fd})\n"
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'agent.cli', 'run'])\n"
    )
    log_path = tmp_path / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", script], pass_fds=(fd,), env=env, stdout=log, stderr=log
        )
    listening.close()
    try:
        deadline = time.monotonic() + 60
        warned: list[dict[str, object]] = []
        while not warned and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-2000:]
            for line in log_path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if entry.get("event") == "socket_settings_ignored":
                    warned.append(entry)
            time.sleep(0.1)
        assert warned and warned[0]["socket_mode"] == "0600" and warned[0]["socket_group"] == "root"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    shutil.rmtree(tmp_path / "state", ignore_errors=True)
