"""The identity of the process on the other end of a Unix socket (SO_PEERCRED).

The kernel fills these in at ``connect()``; the client cannot forge them. Resolution to names and
groups is done here, once per connection, with plain fallbacks when the id has no entry.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerCred:
    pid: int
    uid: int
    gid: int

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return str(self.uid)

    @property
    def groups(self) -> tuple[str, ...]:
        """Primary group plus supplementary groups of the user, by name."""
        names: list[str] = []
        try:
            names.append(grp.getgrgid(self.gid).gr_name)
        except KeyError:
            names.append(str(self.gid))
        try:
            user = pwd.getpwuid(self.uid).pw_name
            gids = os.getgrouplist(user, self.gid)
        except KeyError:
            gids = []
        for gid in gids:
            try:
                name = grp.getgrgid(gid).gr_name
            except KeyError:
                name = str(gid)
            if name not in names:
                names.append(name)
        return tuple(names)


def peer_credentials(sock: socket.socket | None) -> PeerCred | None:
    """Read SO_PEERCRED from a connected AF_UNIX socket; ``None`` for anything else."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid=pid, uid=uid, gid=gid)


__all__ = ["PeerCred", "peer_credentials"]
