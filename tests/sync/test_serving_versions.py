"""Which version a box says it serves (its state's ``serving``, what a staged rollout judges) when
two installed versions of a model are the same file: the weights published again as a new version.
The file cannot tell them apart; the version the service activated last does. (Before, the last
installed version was reported whatever ran: a box of a later wave "moved" without moving, and a
box of the first wave never activated the new version nor measured it.) A real SyncService and
store blob; the pool serves fake engines, the broker is never contacted."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.sync.reconcile import Activate
from tests.sync.helpers import installed_blob, offline_service


@pytest.mark.parametrize(
    ("shared", "activated", "serving"),
    [
        pytest.param(True, "1", "1", id="same-file-v1-activated-serves-v1"),
        pytest.param(True, "2", "2", id="same-file-v2-activated-serves-v2"),
        pytest.param(False, "1", "1", id="own-files-v1-activated-serves-v1"),
        pytest.param(False, "2", "2", id="own-files-v2-activated-serves-v2"),
    ],
)
async def test_serving_version_of_a_shared_file(
    tmp_path: Path, certdir: Path, shared: bool, activated: str, serving: str
) -> None:
    sync = offline_service(tmp_path, certdir)
    try:
        v1 = installed_blob(sync, b"weights", "m")
        v2 = v1 if shared else installed_blob(sync, b"other weights", "m")
        installed = {("m", "1"): v1, ("m", "2"): v2}
        await sync._activate(Activate("m", activated, True), installed[("m", activated)], "models/m/x")
        assert sync._serving(installed) == {"m": serving}
        assert sync.health.version_of("m") == serving  # requests are counted under the same version
    finally:
        await sync.pool.close()  # type: ignore[attr-defined]
        sync.ledger.close()
