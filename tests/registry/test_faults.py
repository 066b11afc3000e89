"""Faults during an import: the process killed with SIGKILL, the disk filling up."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon.catalog import verified_models
from registry.exceptions import Reason, StoreFull
from tests.registry.fleet import Box, Fleet

MiB = 1 << 20


def _cli(state_dir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", "--state-dir", str(state_dir), *args]


def _temps(box: Box) -> list[Path]:
    d = box.registry.store.dir
    return sorted(d.glob(".tmp-*")) if d.is_dir() else []


@pytest.mark.slow
def test_kill_9_during_import_leaves_no_partial_blob_and_the_next_import_completes(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.model("good")
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    big = fleet.model("big", size=160 * MiB)
    bundle = fleet.bundle()

    proc = subprocess.Popen(_cli(box.state_dir, "registry", "import", str(bundle)), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temps = _temps(box)
        if temps and temps[0].stat().st_size > 0:
            break
        assert proc.poll() is None, "the import finished before it could be killed"
        time.sleep(0.002)
    else:
        pytest.fail("no temp file appeared")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.stderr is not None
    proc.stderr.close()

    assert proc.returncode == -signal.SIGKILL
    assert not box.registry.store.has(big.sha256), "a partial blob is visible under its final name"
    assert _temps(box), "the killed import left no trace at all (was it killed mid-write?)"
    assert box.model_ids() == ["good"]
    assert [s.info.id for s in verified_models(box.registry)] == ["good"]

    result = box.import_bundle(bundle)

    assert "models/big/1/model.gguf" in result.installed
    assert _temps(box) == []
    assert box.model_ids() == ["big", "good"]
    assert box.registry.verify().bad == ()


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path | None]:
    """A 4 MiB tmpfs, or None when this machine cannot mount one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def test_disk_full_during_import_is_a_clear_error_and_nothing_is_half_installed(
    tmp_path: Path, small_fs: Path | None
) -> None:
    fleet = Fleet(tmp_path)
    fleet.model("good")
    good_bundle = fleet.bundle()
    fleet.model("big", size=6 * MiB)
    bundle = fleet.bundle()

    if small_fs is None:
        # No mount possible: the same fault through the file size limit (EFBIG), in a subprocess.
        box = fleet.box()
        box.import_bundle(good_bundle)

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (2 * MiB, 2 * MiB))

        done = subprocess.run(
            _cli(box.state_dir, "registry", "import", str(bundle)),
            capture_output=True,
            text=True,
            preexec_fn=limit,
        )
        assert done.returncode == 1
        assert "disk_full" in done.stderr
    else:
        box = Box(small_fs / "state", fleet.root_v1)
        box.import_bundle(good_bundle)
        with pytest.raises(StoreFull) as info:
            box.import_bundle(bundle)
        assert info.value.reason is Reason.DISK_FULL
        assert "no space left" in info.value.detail
        assert box.refusals[-1][0] == "disk_full"

    assert _temps(box) == []
    assert box.registry.store.digests() == sorted(t.sha256 for t in box.registry.index().targets.values())
    assert box.model_ids() == ["good"]
    assert [s.info.id for s in verified_models(box.registry)] == ["good"]
