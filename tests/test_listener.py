"""The listening socket: mode applied before listen, stale files replaced, live sockets kept."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from agent.server.listener import ListenerError, bind_unix, systemd_socket
from agent.server.peercred import peer_credentials


def test_mode_and_listen(tmp_path: Path) -> None:
    path = tmp_path / "run" / "a.sock"
    sock = bind_unix(path, 0o660)
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert stat.S_ISSOCK(path.stat().st_mode)
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        pytest.param("regular-file", "is not a socket", id="regular-file-kept"),
        pytest.param("live-socket", "in use", id="live-socket-kept"),
        pytest.param("missing-group", "does not exist", id="unknown-group"),
    ],
)
def test_refusals(tmp_path: Path, setup: str, error: str) -> None:
    path = tmp_path / "a.sock"
    other = None
    group = None
    if setup == "regular-file":
        path.write_text("data")
    elif setup == "live-socket":
        other = bind_unix(path)
    else:
        group = "no-such-group-edge"
    try:
        with pytest.raises(ListenerError, match=error):
            bind_unix(path, group=group)
        if setup == "regular-file":
            assert path.read_text() == "data"
    finally:
        if other:
            other.close()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    stale = bind_unix(path)
    stale.close()  # the file stays, nothing listens: what a crash leaves behind
    assert path.exists()
    sock = bind_unix(path)
    sock.close()


def test_peer_credentials_are_the_callers(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    server = bind_unix(path)
    server.setblocking(True)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    conn, _ = server.accept()
    try:
        cred = peer_credentials(conn)
        assert cred is not None
        assert (cred.pid, cred.uid, cred.gid) == (os.getpid(), os.getuid(), os.getgid())
        assert cred.user  # resolved to a name or the numeric id
        assert cred.groups[0]
    finally:
        conn.close()
        client.close()
        server.close()


def test_peer_credentials_of_non_unix_socket_is_none() -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert peer_credentials(s) is None
        assert peer_credentials(None) is None
    finally:
        s.close()


def test_systemd_socket_absent_without_listen_fds() -> None:
    assert systemd_socket({}) is None
    assert systemd_socket({"LISTEN_FDS": "1", "LISTEN_PID": "1"}) is None  # not for us
    assert systemd_socket({"LISTEN_FDS": "x"}) is None
