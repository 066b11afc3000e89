"""The content-addressed store: atomic verified installs, re-hashing, garbage collection."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.exceptions import Reason, Refused, StoreError
from registry.store import BlobStore, sha256_file

DATA = os.urandom(3 * (1 << 20) + 17)
SHA = hashlib.sha256(DATA).hexdigest()


def blocks(data: bytes, size: int = 65536) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_install_writes_a_read_only_blob_named_by_its_hash(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    path = store.install(blocks(DATA), name="x", length=len(DATA), sha256=SHA)
    assert path == tmp_path / "sha256" / SHA
    assert path.read_bytes() == DATA
    assert path.stat().st_mode & 0o777 == 0o444
    assert store.digests() == [SHA]
    assert sha256_file(path) == SHA


def test_installed_blob_is_not_rewritten(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.install(blocks(DATA), name="x", length=len(DATA), sha256=SHA)

    def never() -> Iterator[bytes]:
        raise AssertionError("the source must not be read again")
        yield b""

    assert store.install(never(), name="x", length=len(DATA), sha256=SHA).is_file()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (DATA + b"x", Reason.BLOB_TOO_LONG),
        (DATA[:-1], Reason.BLOB_TOO_SHORT),
        (b"y" + DATA[1:], Reason.BLOB_HASH_MISMATCH),
    ],
    ids=["longer", "shorter", "altered"],
)
def test_bad_streams_are_refused_and_leave_nothing(tmp_path: Path, data: bytes, reason: Reason) -> None:
    store = BlobStore(tmp_path)
    with pytest.raises(Refused) as info:
        store.install(blocks(data), name="models/x/1/m.gguf", length=len(DATA), sha256=SHA)
    assert info.value.reason is reason
    assert "models/x/1/m.gguf" in info.value.detail
    assert list((tmp_path / "sha256").iterdir()) == []


def test_a_longer_stream_is_cut_at_the_first_extra_byte(tmp_path: Path) -> None:
    consumed = []

    def endless() -> Iterator[bytes]:
        for b in blocks(DATA):
            consumed.append(len(b))
            yield b
        while True:
            consumed.append(65536)
            yield b"z" * 65536

    with pytest.raises(Refused, match="more than the signed"):
        BlobStore(tmp_path).install(endless(), name="x", length=len(DATA), sha256=SHA)
    assert sum(consumed) <= len(DATA) + 65536


def test_verify_detects_a_changed_blob(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    path = store.install(blocks(DATA), name="x", length=len(DATA), sha256=SHA)
    assert store.verify(SHA, len(DATA)) == path
    os.chmod(path, 0o644)
    with path.open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00" if DATA[1000] else b"\x01")
    with pytest.raises(Refused) as info:
        store.verify(SHA, len(DATA), "models/x/1/m.gguf")
    assert info.value.reason is Reason.BLOB_HASH_MISMATCH
    path.unlink()
    with pytest.raises(Refused) as info:
        store.verify(SHA, len(DATA))
    assert info.value.reason is Reason.NOT_INSTALLED


def test_gc_removes_unreferenced_blobs_and_temps_of_dead_processes(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    store.install(blocks(DATA), name="x", length=len(DATA), sha256=SHA)
    other = b"other"
    other_sha = hashlib.sha256(other).hexdigest()
    store.install([other], name="y", length=len(other), sha256=other_sha)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = store.dir / f".tmp-{SHA[:16]}-{dead_pid}-abcd1234"
    stale.write_bytes(b"partial")
    live = store.dir / f".tmp-{SHA[:16]}-{os.getpid()}-abcd1234"
    live.write_bytes(b"in progress")

    removed = store.gc(keep={SHA})

    assert sorted(removed) == sorted([stale.name, other_sha])
    assert store.digests() == [SHA]
    assert live.exists() and not stale.exists()


@pytest.mark.parametrize(
    "digest", ["", "../x", "AB" * 32, "a" * 63], ids=["empty", "dotdot", "upper", "short"]
)
def test_store_refuses_names_that_are_not_digests(tmp_path: Path, digest: str) -> None:
    with pytest.raises(StoreError) as info:
        BlobStore(tmp_path).path(digest)
    assert info.value.reason is Reason.BAD_PATH


def test_an_unreadable_store_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "sha256").write_text("a file where the blob directory should be")
    store = BlobStore(tmp_path)
    with pytest.raises(StoreError, match="cannot read") as info:
        store.has(SHA)
    assert info.value.reason is Reason.IO_ERROR
