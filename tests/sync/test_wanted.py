"""What a box downloads: nothing until something is deployed to its groups, then only what is
deployed; a bundle chosen by the operator is imported whole (real broker, real hub, real TUF)."""

from __future__ import annotations

from pathlib import Path

import pytest

from registry.publish import set_deployment
from registry.repository import Repository
from tests.sync.broker import Broker
from tests.sync.helpers import (
    enrolled_device,
    installed_files,
    make_blob,
    new_repo,
    publish_model,
    running_device,
    running_hub,
)

CASES = [
    pytest.param(None, True, set(), id="sync-no-deployment-downloads-nothing"),
    pytest.param("other", True, set(), id="sync-deployment-for-another-group-downloads-nothing"),
    pytest.param("edge", True, {"m1"}, id="sync-downloads-only-the-deployed-model"),
    pytest.param(None, False, {"m1", "m2"}, id="bundle-style-import-takes-every-model"),
]


@pytest.mark.parametrize(("deployed_to", "only_deployed", "expected"), CASES)
async def test_a_box_downloads_only_what_is_deployed_to_it(
    own_broker: Broker, tmp_path: Path, deployed_to: str | None, only_deployed: bool, expected: set[str]
) -> None:
    repo = new_repo(tmp_path / "repo")
    m1 = publish_model(repo, make_blob(tmp_path / "m1.gguf", 3 << 20, seed=1), "m1", group=None)
    m2 = publish_model(repo, make_blob(tmp_path / "m2.gguf", 3 << 20, seed=2), "m2", group=None)
    if deployed_to is not None:
        set_deployment(Repository.open(repo.path), deployed_to, "m1", pin=True)
    state = tmp_path / "dev"
    enrolled_device(state, repo.path, "dev-a", groups=("edge",))
    async with running_hub(own_broker, repo.path), running_device(own_broker, state, "dev-a") as dev:
        result = await dev.update(only_deployed=only_deployed)
    sha = {"m1": m1.sha256, "m2": m2.sha256}
    got = {name for name, digest in sha.items() if digest in installed_files(state)}
    assert got == expected
    assert dev.fetcher.transfers == [] or expected, "a transfer ran for a box that wants nothing"
    assert sorted(p for p in result.skipped if p.startswith("models/")) == sorted(
        f"models/{n}/1/{n}.gguf" for n in sha if n not in expected
    )
