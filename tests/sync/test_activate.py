"""A successful activation clears the model's failure record whatever version failed: with a
deployment that names no version, v1 failing and v2 activating later must not leave v1 reported
as ``failing`` forever. A real SyncService on a real ledger and store blob; the pool serves fake
engines (the engine seam), the broker is never contacted."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.sync.ledger import Failure
from agent.sync.reconcile import Activate
from tests.sync.helpers import installed_blob, offline_service


@pytest.mark.parametrize(
    ("failed_version", "activated_version"),
    [
        pytest.param("1", "2", id="other-version-activates"),
        pytest.param("2", "2", id="same-version-activates"),
        pytest.param("3", "2", id="newer-version-failed-older-activates"),
    ],
)
async def test_activation_clears_the_models_failure_whatever_its_version(
    tmp_path: Path, certdir: Path, failed_version: str, activated_version: str
) -> None:
    sync = offline_service(tmp_path, certdir)
    try:
        record = Failure("m", failed_version, 2, 1.0, 2.0, "no memory", sync._basis)
        sync.failures.put(record)
        assert [f["version"] for f in sync._failing_report()] == [failed_version]
        info = installed_blob(sync, b"weights " + activated_version.encode(), "m")
        previous = record if record.version == activated_version else None  # as reconcile passes it
        await sync._activate(Activate("m", activated_version, True), info, "models/m/x", previous)
        assert sync.pool.default_id == "m"
        assert sync.failures.all() == {}
        assert sync._failing_report() == []
        assert [e.status for e in sync.outbox.pending()] == ["activated"]
    finally:
        await sync.pool.close()  # type: ignore[attr-defined]
        sync.ledger.close()


async def test_activation_keeps_other_models_failures(tmp_path: Path, certdir: Path) -> None:
    sync = offline_service(tmp_path, certdir)
    try:
        other = Failure("n", "1", 1, 1.0, 2.0, "no memory", sync._basis)
        sync.failures.put(other)
        info = installed_blob(sync, b"weights", "m")
        await sync._activate(Activate("m", "1", True), info, "models/m/1")
        assert sync.failures.all() == {"n": other}
    finally:
        await sync.pool.close()  # type: ignore[attr-defined]
        sync.ledger.close()
