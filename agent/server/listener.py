"""Create the listening Unix socket, or take it from systemd (LISTEN_FDS).

Invariants: a socket we create has the configured mode and group before ``listen()`` is called,
so no client can connect through a wider mode; a stale socket file left by a crash is replaced
only when nothing answers on it (a second daemon on the same path is refused).

The socket's directory must belong to us or root and must not be writable by everyone without the
sticky bit: otherwise another user could swap the freshly bound socket for a symlink before its
mode and group are set. Mode and group are applied only to the socket we just bound (checked with
``lstat``; the group with ``lchown``, never through a symlink), and on stop the file is removed
only if it is still that socket (same device and inode), never whatever has taken its path.
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
_BOUND: dict[str, tuple[int, int]] = {}
"""(st_dev, st_ino) of each socket file this process bound, by path."""


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


def _check_directory(directory: Path) -> None:
    st = directory.stat()
    if st.st_uid not in (0, os.geteuid()):
        raise ListenerError(
            f"{directory} belongs to uid {st.st_uid}: the socket's directory must be ours or root's"
        )
    if st.st_mode & 0o002 and not st.st_mode & stat.S_ISVTX:
        raise ListenerError(
            f"{directory} is writable by everyone (mode {stat.S_IMODE(st.st_mode):04o}): another user "
            "could replace the socket; use a directory of the service's own"
        )


def bind_unix(path: Path, mode: int = 0o660, group: str | None = None, backlog: int = 128) -> socket.socket:
    """Bind and listen on ``path`` with ``mode`` and ``group`` applied before listening."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_directory(path.parent)
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
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise ListenerError(f"{path} was replaced right after bind; refusing to change its mode")
        if gid != -1:
            os.chown(path, -1, gid, follow_symlinks=False)
        os.chmod(path, mode)
        _BOUND[str(path)] = (st.st_dev, st.st_ino)
    except ListenerError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            path.unlink()
        raise ListenerError(f"cannot set mode/group on {path}: {exc.strerror or exc}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def remove_socket_file(path: Path) -> bool:
    """Remove the socket file this process bound at ``path``, and nothing else: not a file that
    replaced it, not a symlink, not another daemon's socket. True if removed."""
    ident = _BOUND.pop(str(path), None)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if ident is None or not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != ident:
        return False
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return True


__all__ = ["ListenerError", "bind_unix", "remove_socket_file", "systemd_socket"]
