"""The operator's pushes from the command line (``edge-hub deploy``, ``edge-hub deployment set``,
``edge-hub rollout start``) against a real signed repository and hub database: a box where the
model does not fit is refused (named, with the reason) unless ``--force``; a push of a model with
a rollout in progress in the group is refused naming the rollout unless ``--force``, which ends
the rollout (``aborted``, nothing rolled back) and afterwards the controller signs nothing over
the operator's deployment."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.messages import StateReport
from hub.cli import main
from hub.rollout.controller import RolloutController, repo_signer
from hub.rollout.criteria import DEFAULT_CRITERIA
from hub.rollout.store import RolloutStore
from hub.sync.store import HubStore
from registry.publish import current_deployment, set_deployment
from registry.repository import Repository
from tests.sync.helpers import make_blob, new_repo, publish_model

GIB = 1 << 30


def hardware(available: int) -> dict[str, object]:
    return {
        "cpu": {"arch": "x86_64", "features": ["avx2"]},
        "memory": {"total_bytes": 16 * GIB, "available_bytes": available},
        "cgroup": {},
        "disk_free_bytes": 100 * GIB,
    }


@pytest.fixture
def hub(tmp_path: Path) -> tuple[Path, Path]:
    """A repository with m 1 and m 2 (m 1 deployed to edge) and a hub database knowing two boxes
    of edge: ``big`` (8 GiB available) and ``tiny`` (1 MiB available)."""
    repo = new_repo(tmp_path / "repo")
    publish_model(repo, make_blob(tmp_path / "v1.bin", 200_000, 1), "m", "1", group=None, name="model.gguf")
    publish_model(repo, make_blob(tmp_path / "v2.bin", 200_000, 2), "m", "2", group=None, name="model.gguf")
    set_deployment(repo, "edge", "m", version="1", pin=True)
    db = tmp_path / "hub.db"
    store = HubStore(db)
    for dev, available in (("big", 8 * GIB), ("tiny", 1 << 20)):
        state = StateReport(dev, True, groups=("edge",), hardware=hardware(available), serving={"m": "1"})
        store.record_state(dev, state)
    store.close()
    return repo.path, db


def push(command: str, repo: Path, db: Path, *extra: str) -> list[str]:
    version = ["--version", "2"] if command == "rollout" else ["--model-version", "2"]
    head = {"deploy": ["deploy"], "deployment": ["deployment", "set"], "rollout": ["rollout", "start"]}[
        command
    ]
    return [*head, "--group", "edge", "--model", "m", *version, "--repo", str(repo), "--db", str(db), *extra]


@pytest.mark.parametrize("command", ["deploy", "deployment", "rollout"])
@pytest.mark.parametrize(
    ("boxes", "force", "code", "said"),
    [
        pytest.param(("big",), False, 0, "fit m 2 on big: fits", id="fits"),
        pytest.param(("big", "tiny"), False, 1, "does not fit tiny", id="unfit-box-refused"),
        pytest.param(("big", "tiny"), True, 0, "fit m 2 on tiny: no", id="unfit-box-forced"),
    ],
)
def test_fit_from_the_command_line(
    hub: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    command: str,
    boxes: tuple[str, ...],
    force: bool,
    code: int,
    said: str,
) -> None:
    repo, db = hub
    if "tiny" not in boxes:  # the hub knows only the big box
        store = HubStore(db)
        with store.db.tx() as tx:
            tx.execute("DELETE FROM devices WHERE device = 'tiny'")
        store.close()
    before = current_deployment(Repository.open(repo), "edge")
    assert main(push(command, repo, db, *(["--force"] if force else []))) == code
    out = capsys.readouterr()
    assert said in out.out + out.err
    after = current_deployment(Repository.open(repo), "edge")
    rollouts = RolloutStore(HubStore(db))
    if code != 0:  # refused: nothing signed, nothing stored
        assert after == before and rollouts.latest("edge") is None
    elif command == "rollout":  # stored for the controller; the deployment is signed by it
        assert rollouts.latest("edge") is not None and after == before
    else:
        assert after.models[0].version == "2"


def start_rollout(repo: Path, db: Path) -> int:
    """A rollout of m 1 -> 2 with wave 1 signed (what the controller does first)."""
    store = RolloutStore(HubStore(db))
    r = store.create("edge", "m", "2", "1", [1, 2], dict(DEFAULT_CRITERIA), ["big", "tiny"])
    RolloutController(store.store, repo_signer(repo, None)).tick()
    dep = current_deployment(Repository.open(repo), "edge")
    assert dep.waves and dep.waves[0].devices  # the signed wave selector
    return r.id


@pytest.mark.parametrize("command", ["deploy", "deployment"])
@pytest.mark.parametrize(
    ("force", "code", "state", "said"),
    [
        pytest.param(False, 1, "running", "is in progress", id="refused-naming-the-rollout"),
        pytest.param(True, 0, "aborted", "ended (aborted)", id="forced-ends-the-rollout"),
    ],
)
def test_push_during_a_rollout(
    hub: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    command: str,
    force: bool,
    code: int,
    state: str,
    said: str,
) -> None:
    repo, db = hub
    rid = start_rollout(repo, db)
    before = current_deployment(Repository.open(repo), "edge")
    argv = push(command, repo, db, "--force")  # one flag: past the unfit tiny box and the rollout
    if not force:  # without it, only the rollout may refuse: the hub keeps only the box m 2 fits
        store = HubStore(db)
        with store.db.tx() as tx:
            tx.execute("DELETE FROM devices WHERE device = 'tiny'")
        store.close()
        argv = push(command, repo, db)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert said in err and f"rollout {rid}" in err, err
    rollouts = RolloutStore(HubStore(db))
    r = rollouts.get(rid)
    assert r is not None and r.state == state
    after = current_deployment(Repository.open(repo), "edge")
    if not force:
        assert after == before  # the waves stay
        return
    assert not after.waves and after.models[0].version == "2"
    assert [d for _, d, _ in rollouts.history(rid)][-1] == "aborted"
    # the controller signs nothing over the operator's deployment afterwards
    RolloutController(rollouts.store, repo_signer(repo, None)).tick()
    assert current_deployment(Repository.open(repo), "edge") == after
