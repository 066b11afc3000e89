"""Create the listening Unix socket, or take it from systemd (LISTEN_FDS).

Invariants: a socket we create has the configured mode and group before ``listen()`` is called,
so no client can connect through a wider mode; a stale socket file left by a crash is replaced
only when nothing answers on it (a second daemon on the same path is refused).
"""

from __future__ import annotations

import contextlib
import grp
import os
import socket
import stat
from collections.abc import Mapping
from pathlib import Path

from agent.errors import AgentError

SD_LISTEN_FDS_START = 3


class ListenerError(AgentError):
    """The socket cannot be created or taken over."""


def systemd_socket(env: Mapping[str, str] | None = None) -> socket.socket | None:
    """The first AF_UNIX stream socket passed by systemd socket activation, if any."""
    env = os.environ if env is None else env
    if env.get("LISTEN_PID") not in (None, str(os.getpid())):
        return None
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if count < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ListenerError("LISTEN_FDS socket is not an AF_UNIX stream socket")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    sock.setblocking(False)
    return sock


def _in_use(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def bind_unix(path: Path, mode: int = 0o660, group: str | None = None, backlog: int = 128) -> socket.socket:
    """Bind and listen on ``path`` with ``mode`` and ``group`` applied before listening."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
        if _in_use(path):
            raise ListenerError(f"{path} is in use by another process")
        path.unlink()
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ListenerError(f"socket group {group!r} does not exist") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the file appears with at most 0600, then widens to ``mode``
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ListenerError(f"cannot bind {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    try:
        if gid != -1:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise ListenerError(f"cannot set mode/group on {path}: {exc.strerror or exc}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


__all__ = ["ListenerError", "bind_unix", "systemd_socket"]
