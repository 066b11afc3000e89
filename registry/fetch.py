"""Where a device gets repository files from: the fetcher interface and the bundle fetcher.

A fetcher is python-tuf's :class:`tuf.ngclient.FetcherInterface`: implement one method,
``_fetch(url) -> Iterator[bytes]``, and ``close()`` if it holds resources. The device asks for two
kinds of URL, both relative to a base that never changes:

    registry:/metadata/<name>     e.g. ``registry:/metadata/2.root.json``, ``.../timestamp.json``,
                                  ``.../7.snapshot.json``, ``.../7.targets.json``
    registry:/targets/<path>      e.g. ``registry:/targets/models/gemma/1/<sha256>.model.gguf``
                                  (consistent snapshots: the file name is prefixed with its sha256)

Contract for implementations (the MQTT fetcher implements the same):
- yield the file's bytes in blocks of any size; the caller bounds the total and verifies it;
- raise ``tuf.api.exceptions.DownloadHTTPError(message, 404)`` when the file does not exist (the
  client relies on this to find the newest root);
- raise any other exception for transport failures; they are wrapped as ``DownloadError``.
A fetcher never verifies anything: all checks happen in :mod:`registry.device` and
:mod:`registry.trust`.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Protocol

from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient import FetcherInterface

from registry.exceptions import BundleError

METADATA_BASE = "registry:/metadata/"
TARGETS_BASE = "registry:/targets/"
BLOCK_SIZE = 1 << 20
MAX_BUNDLE_ENTRIES = 20_000
"""Tar entries a bundle may hold (headers of any kind): a real one has its metadata files and its
targets, far fewer; past this the bundle is refused before anything is verified."""


def bundle_name(url: str) -> str:
    """``registry:/metadata/x`` -> ``metadata/x``; refuse anything outside the two areas or with
    ``..``/absolute/empty segments (raises ``DownloadHTTPError`` 404: such a file cannot exist)."""
    for base in (METADATA_BASE, TARGETS_BASE):
        if url.startswith(base):
            rel = url.removeprefix("registry:/")
            parts = PurePosixPath(rel).parts
            if rel.startswith("/") or any(p in ("", ".", "..") for p in rel.split("/")) or len(parts) < 2:
                break
            return rel
    raise DownloadHTTPError(f"not a repository file: {url!r}", 404)


class RegistryFetcher(FetcherInterface):
    """Base of the device's fetchers: a context manager around python-tuf's fetcher interface."""

    def close(self) -> None:
        """Release resources (files, connections). Idempotent."""

    def __enter__(self) -> RegistryFetcher:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class BundleFetcher(RegistryFetcher):
    """Reads a bundle made by ``edge-hub bundle export``: a directory or an uncompressed tar file.

    Only regular files inside the bundle are served: symlinks, devices and names that resolve
    outside the bundle directory are reported as missing.

    A tar bundle is read once, header by header, in bounded memory: only regular files under
    ``metadata/`` and ``targets/`` are indexed, tarfile's own list of every header is not kept,
    and a bundle with more than :data:`MAX_BUNDLE_ENTRIES` entries is refused
    (:class:`~registry.exceptions.BundleError`) as soon as the count is passed.
    """

    def __init__(self, bundle: Path) -> None:
        self.bundle = bundle
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        if bundle.is_dir():
            self._root = bundle.resolve()
        elif bundle.is_file():
            try:
                self._tar = tarfile.open(bundle, "r:")  # noqa: SIM115 - closed in close()
                self._members = _index(self._tar, bundle)
            except (tarfile.TarError, OSError) as exc:
                self.close()
                raise BundleError(f"{bundle} is not a readable tar bundle: {exc}") from None
            except BundleError:
                self.close()
                raise
        else:
            raise BundleError(f"bundle {bundle} does not exist")

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = bundle_name(url)
        if self._tar is not None:
            member = self._members.get(name)
            if member is None:
                raise DownloadHTTPError(f"{name} is not in bundle {self.bundle}", 404)
            fh = self._tar.extractfile(member)
            if fh is None:
                raise DownloadHTTPError(f"{name} is not a regular file", 404)
            return _blocks(fh)
        path = (self._root / name).resolve()
        if not path.is_relative_to(self._root) or not path.is_file() or (self._root / name).is_symlink():
            raise DownloadHTTPError(f"{name} is not in bundle {self.bundle}", 404)
        return _file_blocks(path)


def _index(tar: tarfile.TarFile, bundle: Path) -> dict[str, tarfile.TarInfo]:
    """The regular files under ``metadata/`` and ``targets/``; BundleError past the entry cap."""
    members: dict[str, tarfile.TarInfo] = {}
    count = 0
    while (member := tar.next()) is not None:
        count += 1
        if count > MAX_BUNDLE_ENTRIES:
            raise BundleError(
                f"{bundle} has more than {MAX_BUNDLE_ENTRIES} entries; a bundle holds far fewer"
            )
        if member.isreg() and member.name.startswith(("metadata/", "targets/")):
            members[member.name] = member
        tar.members.clear()  # type: ignore[attr-defined]  # tarfile keeps every header it read
    return members


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


def _file_blocks(path: Path) -> Iterator[bytes]:
    """Opened on the first ``next()``, closed when exhausted or dropped (never leaked)."""
    with path.open("rb", buffering=0) as fh:
        while block := fh.read(BLOCK_SIZE):
            yield block


def _blocks(fh: _Readable) -> Iterator[bytes]:
    try:
        while block := fh.read(BLOCK_SIZE):
            yield block
    finally:
        fh.close()


__all__ = ["BLOCK_SIZE", "METADATA_BASE", "TARGETS_BASE", "BundleFetcher", "RegistryFetcher", "bundle_name"]
