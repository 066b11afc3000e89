"""Small file helpers shared by the hub and the device: atomic writes and bounded reads.

Invariants: :func:`atomic_write` never leaves a partially written file under the final name (temp
file in the same directory, fsync, ``os.replace``, fsync of the directory); :func:`read_bounded`
never reads more than ``limit + 1`` bytes. OS errors are translated: ``ENOSPC``/``EFBIG`` become
:class:`StoreFull`, others :class:`StoreError`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from registry.exceptions import Reason, StoreError, StoreFull

TEMP_PREFIX = ".tmp-"


def translate_os_error(exc: OSError, what: str) -> StoreError:
    """``ENOSPC``/``EDQUOT``/``EFBIG`` -> :class:`StoreFull`; anything else -> :class:`StoreError`."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"{what}: no space left ({exc.strerror})")
    if exc.errno == errno.EFBIG:
        return StoreFull(f"{what}: file size limit reached ({exc.strerror})")
    if exc.errno == errno.ENOENT:
        return StoreError(f"{what}: {exc.strerror or exc}", reason=Reason.MISSING)
    return StoreError(f"{what}: {exc.strerror or exc}")


def temp_name(directory: Path, hint: str = "") -> Path:
    """A fresh hidden temp path in ``directory`` that names the writing process."""
    return directory / f"{TEMP_PREFIX}{hint}{'-' if hint else ''}{os.getpid()}-{secrets.token_hex(4)}"


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = temp_name(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):  # absent, or its directory cannot be made
            tmp.unlink()
        raise translate_os_error(exc, f"cannot write {path}") from None


def read_bounded(path: Path, limit: int) -> bytes:
    """Read at most ``limit`` bytes; a longer file raises :class:`StoreError`."""
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise translate_os_error(exc, f"cannot read {path}") from None
    if len(data) > limit:
        raise StoreError(f"{path} is larger than {limit} bytes", reason=Reason.METADATA_TOO_LARGE)
    return data


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "TEMP_PREFIX",
    "atomic_write",
    "fsync_dir",
    "pid_alive",
    "read_bounded",
    "temp_name",
    "translate_os_error",
]
