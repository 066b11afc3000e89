"""The device's content-addressed blob store: ``<root>/sha256/<hex>``.

Invariants:
- A file under its final name ``sha256/<hex>`` has exactly the bytes whose sha256 is ``<hex>`` at
  the moment it was renamed there: it is written to a hidden temp file in the same directory
  (``.tmp-<hex>-<pid>-<random>``), fsynced, verified by :class:`~registry.trust.BlobVerifier`,
  made read-only, then renamed, and the directory is fsynced. A crash (even ``kill -9``) leaves at
  most a temp file, which no reader looks at and :meth:`BlobStore.gc` removes.
- Every read is bounded by the signed length; an incoming stream longer than that is cut off at
  the first extra byte.
- Disk full (``ENOSPC``) or the file size limit (``EFBIG``) raise :class:`StoreFull` and leave no
  temp file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from registry.exceptions import Reason, Refused, StoreError
from registry.files import TEMP_PREFIX, fsync_dir, pid_alive, temp_name, translate_os_error
from registry.trust import BlobVerifier

_HEX64 = re.compile(r"[0-9a-f]{64}")
READ_BLOCK = 1 << 20


class BlobStore:
    """Blobs by sha256 under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "sha256"

    def path(self, sha256: str) -> Path:
        if not _HEX64.fullmatch(sha256):
            raise StoreError(f"not a sha256 digest: {sha256!r}", reason=Reason.BAD_PATH)
        return self.dir / sha256

    def has(self, sha256: str, length: int | None = None) -> bool:
        path = self.path(sha256)
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise translate_os_error(exc, f"cannot read {path}") from None
        return length is None or st.st_size == length

    def digests(self) -> list[str]:
        """Every installed blob (temp files excluded)."""
        if not self.dir.is_dir():
            return []
        try:
            return sorted(p.name for p in self.dir.iterdir() if _HEX64.fullmatch(p.name))
        except OSError as exc:
            raise translate_os_error(exc, f"cannot list {self.dir}") from None

    def install(self, blocks: Iterable[bytes], *, name: str, length: int, sha256: str) -> Path:
        """Write ``blocks`` as blob ``sha256`` (signed ``length``); return its path.

        An already installed blob of the right size is kept (content addressing) and ``blocks``
        is not consumed."""
        final = self.path(sha256)
        if self.has(sha256, length):
            return final
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise translate_os_error(exc, f"cannot create {self.dir}") from None
        tmp = temp_name(self.dir, sha256[:16])
        verifier = BlobVerifier(name, length, sha256)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb", buffering=0) as fh:
                for block in blocks:
                    verifier.update(block)
                    view = memoryview(block)
                    while view:
                        written = fh.write(view)
                        view = view[written or 0 :]
                os.fsync(fh.fileno())
            verifier.finish()
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            fsync_dir(self.dir)
        except OSError as exc:
            _unlink(tmp)
            raise translate_os_error(exc, f"cannot install {name}") from None
        except BaseException:
            _unlink(tmp)
            raise
        return final

    def verify(self, sha256: str, length: int, name: str | None = None) -> Path:
        """Re-hash an installed blob; raise :class:`Refused` unless it matches, return its path."""
        path = self.path(sha256)
        verifier = BlobVerifier(name or sha256[:16], length, sha256)
        buf = bytearray(READ_BLOCK)
        view = memoryview(buf)
        try:
            with path.open("rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    verifier.update(view[:n])
        except FileNotFoundError:
            raise Refused(
                f"{name or sha256}: blob is missing from the store", reason=Reason.NOT_INSTALLED
            ) from None
        except OSError as exc:
            raise translate_os_error(exc, f"cannot read {path}") from None
        verifier.finish()
        return path

    def remove(self, sha256: str) -> bool:
        path = self.path(sha256)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise translate_os_error(exc, f"cannot remove {path}") from None
        return True

    def stale_temps(self) -> list[Path]:
        """Temp files left by processes that are gone (crash, kill -9)."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            if p.name.startswith(TEMP_PREFIX):
                parts = p.name.split("-")
                pid = int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None
                if pid is None or (pid != os.getpid() and not pid_alive(pid)):
                    out.append(p)
        return out

    def gc(self, keep: Iterable[str]) -> list[str]:
        """Remove blobs not in ``keep`` and stale temp files; return what was removed."""
        wanted = set(keep)
        removed = []
        for p in self.stale_temps():
            _unlink(p)
            removed.append(p.name)
        for digest in self.digests():
            if digest not in wanted and self.remove(digest):
                removed.append(digest)
        return removed


def sha256_file(path: Path) -> str:
    """Plain sha256 of a file (the peer the verification benchmark compares against)."""
    h = hashlib.sha256()
    buf = bytearray(READ_BLOCK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


__all__ = ["READ_BLOCK", "BlobStore", "sha256_file"]
