"""The device registry: enrollment, what an import installs, and the installed set over time."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from agent.daemon.catalog import verified_models
from registry.device import DeviceRegistry
from registry.exceptions import ManifestError, NotEnrolled, Reason, Refused, StoreError
from registry.metadata import DOCUMENT_MAX_BYTES, Deployment, DeploymentEntry
from tests.registry.fleet import Box, Fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


def test_import_from_a_tar_bundle_installs_every_model_and_the_named_policy(fleet: Fleet) -> None:
    a = fleet.model("a")
    fleet.repo.add_bytes("policies/default.json", b'{"roles": {}}', {"kind": "policy"})
    fleet.repo.add_bytes(
        "deployments/lab.json", Deployment("lab", policy="default").to_json(), {"kind": "deployment"}
    )
    fleet.repo.publish()
    box = fleet.box()

    result = box.import_bundle(fleet.bundle(tar=True))

    assert set(result.installed) == {a.target_path, "policies/default.json", "deployments/lab.json"}
    assert box.model_ids() == ["a"]
    assert box.registry.policy_bytes("default") == b'{"roles": {}}'
    again = box.import_bundle(fleet.bundle(tar=True))
    assert again.installed == () and set(again.already) == set(result.installed)


def test_a_group_deployment_selects_the_models_and_other_groups_are_skipped(fleet: Fleet) -> None:
    fleet.model("a")
    fleet.model("b", version="1")
    fleet.model("b", version="2")
    fleet.deploy("lab", "b")
    fleet.deploy("shop", "a")
    box = fleet.box(groups=("lab",))

    result = box.import_bundle(fleet.bundle())

    assert [(m.id, m.manifest.version) for m in box.registry.models()] == [("b", "2")]
    assert "deployments/shop.json" in result.skipped and "models/a/1/model.gguf" in result.skipped
    assert [d.group for d in box.registry.deployments()] == ["lab"]


def test_a_deployment_naming_an_unsigned_model_is_refused(fleet: Fleet) -> None:
    fleet.model("a")
    dep = Deployment("lab", (DeploymentEntry("ghost"),))
    fleet.repo.add_bytes("deployments/lab.json", dep.to_json(), {"kind": "deployment"})
    fleet.repo.publish()
    box = fleet.box()
    with pytest.raises(Refused) as info:
        box.import_bundle(fleet.bundle())
    assert info.value.reason is Reason.MISSING
    assert "ghost" in info.value.detail
    assert box.model_ids() == []


def test_pinned_model_is_served_first(fleet: Fleet) -> None:
    fleet.model("a")
    fleet.model("b")
    fleet.repo.add_bytes(
        "deployments/lab.json",
        Deployment("lab", (DeploymentEntry("a"), DeploymentEntry("b", pin=True))).to_json(),
        {"kind": "deployment"},
    )
    fleet.repo.publish()
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    assert [(s.info.id, s.pinned) for s in verified_models(box.registry)] == [("b", True), ("a", False)]


def test_a_blob_changed_on_disk_is_refused_at_load_and_the_others_are_served(fleet: Fleet) -> None:
    a = fleet.model("a")
    fleet.model("b")
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    blob = box.registry.store.path(a.sha256)
    os.chmod(blob, 0o644)
    with blob.open("r+b") as fh:
        fh.write(b"evil")

    served = verified_models(box.registry)

    assert [s.info.id for s in served] == ["b"]
    assert box.refusals[-1][0] == "blob_hash_mismatch"
    result = box.registry.verify()
    assert [p for p, _ in result.bad] == [a.target_path]
    assert box.model_ids() == ["b"]
    assert not blob.exists()
    box.import_bundle(fleet.bundle())  # an import restores it
    assert box.model_ids() == ["a", "b"]


def test_remove_and_gc(fleet: Fleet) -> None:
    a = fleet.model("a")
    b = fleet.model("b")
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    assert box.registry.remove("a") == [a.target_path]
    assert box.model_ids() == ["b"]
    assert not box.registry.store.has(a.sha256)
    with pytest.raises(StoreError) as info:
        box.registry.remove("a")
    assert info.value.reason is Reason.NOT_INSTALLED
    stray = box.registry.store.dir / ("f" * 64)
    stray.write_bytes(b"unreferenced")
    assert box.registry.gc() == ["f" * 64]
    assert box.registry.store.digests() == [b.sha256]


def test_not_enrolled_device_refuses_imports(tmp_path: Path, fleet: Fleet) -> None:
    fleet.model("a")
    seen: list[tuple[str, str]] = []
    reg = DeviceRegistry(tmp_path / "fresh", on_refusal=lambda r, d: seen.append((r, d)))
    with pytest.raises(NotEnrolled):
        reg.import_bundle(fleet.bundle())
    assert seen and seen[0][0] == "not_enrolled"


@pytest.mark.parametrize(
    ("device_id", "groups", "message"),
    [
        ("box 1", ("lab",), "bad device id"),
        ("", ("lab",), "bad device id"),
        ("box-1", (), "bad groups"),
        ("box-1", ("Lab",), "bad groups"),
        ("box-1", ("../x",), "bad groups"),
    ],
    ids=["space-in-id", "empty-id", "no-group", "uppercase-group", "dotdot-group"],
)
def test_enroll_refuses_bad_identity(
    tmp_path: Path, fleet: Fleet, device_id: str, groups: tuple[str, ...], message: str
) -> None:
    with pytest.raises(ManifestError, match=message):
        DeviceRegistry(tmp_path / "d").enroll(fleet.root_v1, device_id, groups)


def test_enroll_refuses_a_root_that_is_not_a_trust_anchor(tmp_path: Path, fleet: Fleet) -> None:
    reg = DeviceRegistry(tmp_path / "d")
    with pytest.raises(Refused) as info:
        reg.enroll(b"not json", "box-1", ("lab",))
    assert info.value.reason is Reason.MALFORMED
    md = Metadata.from_bytes(fleet.root_v1)
    md.signatures = dict(list(md.signatures.items())[:1])  # 1 of the 2 required
    with pytest.raises(Refused) as info:
        reg.enroll(md.to_bytes(JSONSerializer()), "box-1", ("lab",))
    assert info.value.reason is Reason.THRESHOLD
    assert not reg.enrolled


def test_re_enrolling_with_another_root_needs_force(tmp_path: Path, fleet: Fleet) -> None:
    fleet.model("a")
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    other = Fleet(tmp_path / "other-fleet")
    with pytest.raises(ManifestError, match="another root"):
        box.registry.enroll(other.root_v1, "box-1", ("lab",))
    box.registry.enroll(other.root_v1, "box-1", ("lab",), force=True)
    assert box.model_ids() == []
    other.model("z")
    box.import_bundle(other.bundle())
    assert box.model_ids() == ["z"]
    with pytest.raises(Refused):  # the old fleet is no longer trusted
        box.import_bundle(fleet.bundle())


def test_bundle_that_does_not_exist_or_is_not_a_tar(tmp_path: Path, fleet: Fleet) -> None:
    box = Box(tmp_path / "b", fleet.root_v1)
    for bundle in (tmp_path / "nope", tmp_path / "x.tar"):
        if bundle.name.endswith(".tar"):
            bundle.write_bytes(b"garbage")
        with pytest.raises(Exception) as info:
            box.import_bundle(bundle)
        assert getattr(info.value, "reason", None) is Reason.BUNDLE_UNREADABLE
    assert [r for r, _ in box.refusals] == ["bundle_unreadable", "bundle_unreadable"]


def test_index_is_plain_json_naming_verified_targets(fleet: Fleet) -> None:
    a = fleet.model("a")
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    data = json.loads(box.registry.index_path.read_bytes())
    assert [t["path"] for t in data["targets"]] == [a.target_path]
    assert data["targets"][0]["sha256"] == a.sha256


def test_documents_follow_the_signed_set_and_oversized_ones_are_refused(fleet: Fleet) -> None:
    fleet.repo.add_bytes("policies/default.json", b'{"roles": {}}', {"kind": "policy"})
    fleet.repo.add_bytes(
        "deployments/lab.json", Deployment("lab", policy="default").to_json(), {"kind": "deployment"}
    )
    fleet.repo.publish()
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    assert box.registry.policy_bytes("default") is not None
    fleet.repo.remove_target("policies/default.json")
    fleet.repo.remove_target("deployments/lab.json")
    fleet.repo.publish()
    box.import_bundle(fleet.bundle())
    assert box.registry.policy_bytes("default") is None
    assert box.registry.deployments() == []
    fleet.repo.add_bytes("policies/huge.json", b" " * (DOCUMENT_MAX_BYTES + 1), {"kind": "policy"})
    fleet.repo.add_bytes(
        "deployments/lab.json", Deployment("lab", policy="huge").to_json(), {"kind": "deployment"}
    )
    fleet.repo.publish()
    with pytest.raises(Refused) as info:
        box.import_bundle(fleet.bundle())
    assert info.value.reason is Reason.METADATA_TOO_LARGE
