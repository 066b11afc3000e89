"""registry.files: a write or read the OS refuses is a StoreError naming the path, never an OSError."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from registry.exceptions import Reason, StoreError
from registry.files import atomic_write, read_bounded


def _file(tmp_path: Path) -> Path:
    f = tmp_path / "a-file"
    f.write_text("x")
    return f


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        (lambda tmp: _file(tmp) / "doc.json", Reason.IO_ERROR),
        (lambda tmp: _file(tmp) / "sub" / "doc.json", Reason.IO_ERROR),
        (lambda tmp: tmp, Reason.IO_ERROR),
    ],
    ids=["parent-is-a-file", "grandparent-is-a-file", "target-is-a-directory"],
)
def test_atomic_write_refused(tmp_path: Path, target: Callable[[Path], Path], reason: Reason) -> None:
    path = target(tmp_path)
    with pytest.raises(StoreError, match="cannot write") as err:
        atomic_write(path, b"{}")
    assert err.value.reason == reason
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == []


@pytest.mark.parametrize(
    ("name", "limit", "reason"),
    [("absent", 10, Reason.MISSING), ("big", 3, Reason.METADATA_TOO_LARGE)],
    ids=["absent", "over-the-limit"],
)
def test_read_bounded_refused(tmp_path: Path, name: str, limit: int, reason: Reason) -> None:
    (tmp_path / "big").write_bytes(b"0123")
    with pytest.raises(StoreError) as err:
        read_bounded(tmp_path / name, limit)
    assert err.value.reason == reason


def test_atomic_write_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "new" / "doc.json"
    atomic_write(path, b"one")
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in path.parent.iterdir()] == ["doc.json"]
