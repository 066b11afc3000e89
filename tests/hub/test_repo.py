"""The hub repository: keys on disk, signing thresholds, rotations, bundles."""

from __future__ import annotations

import stat
import tarfile
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root

from registry.exceptions import RepositoryError
from registry.keys import passphrase_from_env
from registry.repository import Repository
from tests.registry.fleet import Fleet


def test_init_writes_keys_0600_in_a_0700_directory_and_signs_every_role(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "r", root_threshold=2, root_keys=3)
    keys = list((tmp_path / "r" / "keys").glob("*.pem"))
    assert len(keys) == 6
    assert all(stat.S_IMODE(k.stat().st_mode) == 0o600 for k in keys)
    assert stat.S_IMODE((tmp_path / "r" / "keys").stat().st_mode) == 0o700
    root = Metadata[Root].from_file(str(tmp_path / "r" / "metadata" / "1.root.json"))
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)
    assert root.signed.roles["root"].threshold == 2
    assert root.signed.consistent_snapshot
    assert len(root.signatures) == 3
    assert repo.timestamp.signed.snapshot_meta.version == repo.snapshot.signed.version


def test_encrypted_keys_need_the_passphrase(tmp_path: Path) -> None:
    Repository.init(tmp_path / "r", passphrase=b"correct horse", passphrase_env="PW")
    pem = next((tmp_path / "r" / "keys").glob("*.pem")).read_bytes()
    assert b"ENCRYPTED" in pem
    with pytest.raises(RepositoryError, match="encrypted"):
        Repository.open(tmp_path / "r").refresh_timestamp()
    with pytest.raises(RepositoryError, match="wrong passphrase"):
        Repository.open(tmp_path / "r", b"wrong").refresh_timestamp()
    repo = Repository.open(tmp_path / "r", b"correct horse")
    repo.refresh_timestamp()
    assert repo.timestamp.signed.version == 2


@pytest.mark.parametrize(
    ("env", "message"),
    [({}, "not set"), ({"PW": ""}, "not set or empty")],
    ids=["unset", "empty"],
)
def test_passphrase_variable_must_be_set(env: dict[str, str], message: str) -> None:
    with pytest.raises(RepositoryError, match=message):
        passphrase_from_env("PW", env)


@pytest.mark.parametrize(
    ("threshold", "keys"),
    [(0, 1), (3, 2), (1, 17)],
    ids=["zero-threshold", "threshold-above-keys", "too-many"],
)
def test_init_refuses_impossible_thresholds(tmp_path: Path, threshold: int, keys: int) -> None:
    with pytest.raises(RepositoryError, match="threshold"):
        Repository.init(tmp_path / "r", root_threshold=threshold, root_keys=keys)


def test_init_refuses_an_existing_repository_and_open_refuses_a_plain_directory(tmp_path: Path) -> None:
    Repository.init(tmp_path / "r")
    with pytest.raises(RepositoryError, match="already holds"):
        Repository.init(tmp_path / "r")
    with pytest.raises(RepositoryError, match="not a repository"):
        Repository.open(tmp_path)


def test_init_where_keys_cannot_be_written_is_a_repository_error(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keys").write_text("a file where the key directory should be")
    with pytest.raises(RepositoryError, match="cannot create key directory"):
        Repository.init(tmp_path / "r")


def test_key_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    Repository.init(tmp_path / "r")
    for k in (tmp_path / "r" / "keys").glob("*.pem"):
        k.chmod(0o644)
    with pytest.raises(RepositoryError, match="readable by others"):
        Repository.open(tmp_path / "r").refresh_timestamp()


def test_root_rotation_is_signed_by_old_and_new_keys_and_retires_the_old(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    old = set(fleet.repo.root.signed.roles["root"].keyids)
    fleet.repo.rotate_root(threshold=2)
    v2 = Metadata[Root].from_file(str(fleet.repo.path / "metadata" / "2.root.json"))
    new = set(v2.signed.roles["root"].keyids)
    assert not old & new
    assert old | new <= set(v2.signatures)
    v1 = Metadata[Root].from_file(str(fleet.repo.path / "metadata" / "1.root.json"))
    v1.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)
    v2.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)
    retired = {p.stem for p in (fleet.repo.path / "keys" / "retired").glob("*.pem")}
    assert retired == old
    # a device enrolled with v1 walks to v2 and keeps importing
    fleet.model("a")
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    assert box.model_ids() == ["a"]


def test_revoking_the_targets_key_resigns_targets_and_devices_follow(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.model("a")
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    old = fleet.repo.root.signed.roles["targets"].keyids[0]
    new = fleet.repo.revoke_key("targets")
    assert fleet.repo.root.signed.roles["targets"].keyids == [new]
    assert list(fleet.repo.targets.signatures) == [new]
    assert old != new
    fleet.model("b")
    box.import_bundle(fleet.bundle())
    assert box.model_ids() == ["a", "b"]


def test_revoke_needs_a_keyid_when_a_role_has_several(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    with pytest.raises(RepositoryError, match="name the one"):
        fleet.repo.revoke_key("root")
    with pytest.raises(RepositoryError, match="unknown role"):
        fleet.repo.revoke_key("admin")
    first = fleet.repo.root.signed.roles["root"].keyids[0]
    fleet.repo.revoke_key("root", first[:12])
    assert first not in fleet.repo.root.signed.roles["root"].keyids


def test_signing_without_enough_root_keys_is_refused(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    for keyid in fleet.repo.root.signed.roles["root"].keyids[:2]:
        fleet.repo.keys.retire(keyid)  # two of three root keys are offline
    with pytest.raises(RepositoryError, match="not enough of the current root keys"):
        fleet.repo.rotate_root()


def test_tar_and_directory_bundles_hold_the_same_files(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.model("a")
    fleet.repo.rotate_root()
    d = fleet.bundle()
    t = fleet.bundle(tar=True)
    in_dir = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    with tarfile.open(t) as tar:
        in_tar = sorted(m.name for m in tar.getmembers())
    assert in_dir == in_tar
    assert "metadata/1.root.json" in in_dir and "metadata/2.root.json" in in_dir
