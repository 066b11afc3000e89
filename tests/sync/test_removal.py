"""Undeployed models are removed: the pure rules as tables, the registry's per-version removal, and
end to end with a real Mosquitto, the hub and the real Gemma model: deploy v1 then v2 (v1 is kept as
the rollback target), then another model (the first is unloaded, its blobs deleted after the grace
period), while a model configured locally is never touched."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from agent.daemon.catalog import info_for_file
from agent.sync.removal import PoolModel, due_for_removal, kept_versions, to_unload, unneeded_since
from agent.sync.service import SyncOptions, SyncService
from registry.exceptions import Reason, StoreError
from registry.metadata import Deployment, DeploymentEntry, deployment_target_path
from registry.repository import Repository
from tests.sync.broker import Broker
from tests.sync.helpers import (
    device_audit,
    enrolled_device,
    installed_files,
    new_repo,
    publish_model,
    small_llama_pool,
    started_hub_server,
    wait_for,
)


def dep(*entries: tuple[str, str | None, bool]) -> list[Deployment]:
    return [Deployment("edge", tuple(DeploymentEntry(m, v, p) for m, v, p in entries))]


M1, M2, M3 = ("m", "1"), ("m", "2"), ("m", "3")


@pytest.mark.parametrize(
    ("deployments", "installed", "serving", "keep_previous", "kept"),
    [
        pytest.param(dep(), [M1, M2], {}, True, None, id="no-deployment-no-opinion"),
        pytest.param(dep(("m", "2", True)), [M1, M2], {"m": "2"}, True, {M1, M2}, id="previous-kept"),
        pytest.param(dep(("m", "2", True)), [M1, M2], {"m": "2"}, False, {M2}, id="previous-not-kept"),
        pytest.param(
            dep(("m", "3", True)), [M1, M2, M3], {"m": "3"}, True, {M2, M3}, id="older-than-previous"
        ),
        pytest.param(
            dep(("m", None, True)), [M1, M2, M3], {"m": "3"}, True, {M2, M3}, id="newest-by-default"
        ),
        pytest.param(
            dep(("m", "3", True)), [M1, M2, M3], {"m": "1"}, False, {M1, M3}, id="serving-version-kept"
        ),
        pytest.param(dep(("m", "9", True)), [M1, M2], {}, True, {M1, M2}, id="deployed-version-missing"),
        pytest.param(
            dep(("n", "1", True)), [M1, ("n", "1")], {"n": "1"}, True, {("n", "1")}, id="other-model"
        ),
        pytest.param(
            dep(("m", "10", True)),
            [M1, ("m", "9"), ("m", "10")],
            {},
            True,
            {("m", "9"), ("m", "10")},
            id="numeric-version-order",
        ),
    ],
)
def test_kept_versions(
    deployments: list[Deployment],
    installed: list[tuple[str, str]],
    serving: dict[str, str],
    keep_previous: bool,
    kept: set[tuple[str, str]] | None,
) -> None:
    assert kept_versions(deployments, installed, serving, keep_previous) == kept


@pytest.mark.parametrize(
    ("previous", "now", "grace", "in_use", "since", "due"),
    [
        pytest.param({}, 100.0, 10.0, [], {M1: 100.0}, [], id="newly-unneeded"),
        pytest.param({M1: 95.0}, 100.0, 10.0, [], {M1: 95.0}, [], id="within-grace"),
        pytest.param({M1: 90.0}, 100.0, 10.0, [], {M1: 90.0}, [M1], id="grace-over"),
        pytest.param({M1: 10.0}, 100.0, 10.0, [M1], {M1: 10.0}, [], id="in-use-never-removed"),
        pytest.param({M2: 10.0}, 100.0, 10.0, [], {M1: 100.0}, [], id="needed-again-forgotten"),
        pytest.param({M1: 100.0}, 100.0, 0.0, [], {M1: 100.0}, [M1], id="no-grace"),
    ],
)
def test_grace_period(
    previous: dict[tuple[str, str], float],
    now: float,
    grace: float,
    in_use: list[tuple[str, str]],
    since: dict[tuple[str, str], float],
    due: list[tuple[str, str]],
) -> None:
    # installed: M1 and M3; M3 (and M2, if installed) is kept
    got = unneeded_since(previous, [M1, M3], {M3}, now)
    assert got == since
    assert due_for_removal(got, now, grace, in_use) == due


@pytest.mark.parametrize(
    ("deployments", "pool", "default", "unload"),
    [
        pytest.param(
            dep(("n", None, True)), [PoolModel("m", True), PoolModel("n", True)], "n", ["m"], id="undeployed"
        ),
        pytest.param(
            dep(("n", None, True)), [PoolModel("m", False), PoolModel("n", True)], "n", [], id="local-kept"
        ),
        pytest.param(
            dep(("n", None, True)), [PoolModel("m", True), PoolModel("n", True)], "m", [], id="default-kept"
        ),
        pytest.param(dep(("n", None, True)), [PoolModel("m", True)], None, [], id="last-model-kept"),
        pytest.param(
            dep(("n", None, True)),
            [PoolModel("a", True), PoolModel("b", True)],
            None,
            ["b"],
            id="one-of-last-kept",
        ),
        pytest.param(dep(), [PoolModel("m", True), PoolModel("n", True)], "n", [], id="no-deployment"),
        pytest.param(dep(("m", "2", True)), [PoolModel("m", True)], "m", [], id="deployed-kept"),
    ],
)
def test_to_unload(
    deployments: list[Deployment], pool: list[PoolModel], default: str | None, unload: list[str]
) -> None:
    assert to_unload(deployments, pool, default) == unload


def test_registry_removes_one_version(tmp_path: Path) -> None:
    from tests.registry.fleet import Fleet

    fleet = Fleet(tmp_path)
    a1 = fleet.model("a", version="1")
    a2 = fleet.model("a", version="2")
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    assert box.registry.remove("a", "1") == [a1.target_path]
    assert [(m.id, m.manifest.version) for m in box.registry.models()] == [("a", "2")]
    assert not box.registry.store.has(a1.sha256) and box.registry.store.has(a2.sha256)
    with pytest.raises(StoreError, match="model 'a' version '1' is not installed") as info:
        box.registry.remove("a", "1")
    assert info.value.reason is Reason.NOT_INSTALLED


def variant(source: Path, dest: Path, seed: int) -> Path:
    """A copy of ``source`` that differs in one harmless header value (its padding token id): a
    different blob that loads and answers like the original."""
    from gguf import GGUFReader

    shutil.copyfile(source, dest)
    reader = GGUFReader(dest, "r+")
    field = reader.get_field("tokenizer.ggml.padding_token_id")
    assert field is not None
    field.parts[field.data[0]][0] = 3 + seed
    reader.data.flush()
    del reader
    return dest


def deploy_only(repo_dir: Path, model: str, version: str) -> None:
    repo = Repository.open(repo_dir)
    deployment = Deployment("edge", (DeploymentEntry(model, version, True),))
    repo.add_bytes(deployment_target_path("edge"), deployment.to_json(), {"kind": "deployment"})
    repo.publish()


GRACE_S = 3.0


@pytest.mark.model
@pytest.mark.slow
async def test_undeployed_model_is_unloaded_and_deleted_after_grace_local_model_kept(
    broker: Broker, tmp_path: Path, gemma_path: Path
) -> None:
    repo = new_repo(tmp_path / "repo")
    v1 = publish_model(repo, gemma_path, "gemma", "1", chunk_size=4 << 20, group=None, name="model.gguf")
    deploy_only(repo.path, "gemma", "1")
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")
    hub = await started_hub_server(repo.path, tmp_path, broker)
    audit, key = device_audit(tmp_path / "dev", hub)

    pool = small_llama_pool()
    pool.register(info_for_file(gemma_path, "local"))  # configured locally ([model]), outside the store
    options = SyncOptions(
        "dev-a",
        broker.client_config("dev-a"),
        refresh_interval_s=1.0,
        state_interval_s=1.0,
        audit_key_hex=key.public.raw.hex(),
        keep_previous=True,
        removal_grace_s=GRACE_S,
    )
    sync = SyncService(options, tmp_path / "dev", pool, audit=audit)
    store = hub.store
    assert store is not None

    def sent(status: str, target: str) -> list[float]:
        return [e.at for e in sync.events_sent if e.status == status and e.target == target]

    try:
        await sync.start()
        await wait_for(lambda: sent("activated", "models/gemma/1"), 240, "activation of gemma 1")

        v2 = publish_model(
            Repository.open(repo.path),
            variant(gemma_path, tmp_path / "g2.gguf", 1),
            "gemma",
            "2",
            chunk_size=4 << 20,
            group=None,
            name="model.gguf",
        )
        deploy_only(repo.path, "gemma", "2")
        await wait_for(lambda: sent("activated", "models/gemma/2"), 240, "activation of gemma 2")
        rounds = sync.rounds
        await asyncio.sleep(GRACE_S + 1)
        await sync.wait_rounds(rounds + 3, 60)
        # v1 is the rollback target: kept past the grace period.
        assert {v1.sha256, v2.sha256} <= set(installed_files(tmp_path / "dev"))
        assert [e for e in sync.events_sent if e.status in ("removed", "unloaded")] == []

        other = publish_model(
            Repository.open(repo.path),
            variant(gemma_path, tmp_path / "o1.gguf", 2),
            "other",
            "1",
            chunk_size=4 << 20,
            group=None,
            name="model.gguf",
        )
        deploy_only(repo.path, "other", "1")
        await wait_for(lambda: sent("activated", "models/other/1"), 240, "activation of other")
        await wait_for(lambda: sent("unloaded", "models/gemma"), 30, "gemma unloaded")
        await wait_for(
            lambda: sent("removed", "models/gemma/1") and sent("removed", "models/gemma/2"),
            60,
            "gemma's versions removed",
        )
        activated = sent("activated", "models/other/1")[0]
        assert (
            min(sent("removed", "models/gemma/1") + sent("removed", "models/gemma/2")) - activated
            >= GRACE_S - 0.5
        )
        blobs = installed_files(tmp_path / "dev")
        assert v1.sha256 not in blobs and v2.sha256 not in blobs and other.sha256 in blobs
        assert [m.id for m in sync.registry.models()] == ["other"]
        served = {m.id: m for m in pool.models()}
        assert set(served) == {"other", "local"} and pool.default_id == "other"
        assert served["local"].path == gemma_path and gemma_path.is_file()  # the local model is untouched

        await wait_for(lambda: audit.backlog() == 0, 30, "audit upload")
        actions = [(r["action"], r["resource"]) for r in store.audit_records("dev-a")]
        assert ("deployment.unload", "models/gemma") in actions
        assert ("deployment.remove", "models/gemma/1") in actions
        assert ("deployment.remove", "models/gemma/2") in actions
        await wait_for(
            lambda: {"removed", "unloaded"} <= {e.status for _, e in store.events("dev-a")},
            30,
            "events at the hub",
        )
    finally:
        await sync.close()
        await hub.close()
        await pool.close()
        audit.close()
