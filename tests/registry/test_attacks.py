"""The attack and fault table of issue 3, against real signed repositories.

Every case starts from a box that imported a good bundle (model ``good``), then imports a bundle
the attacker made. Each must be refused with the named reason, reported through ``on_refusal``,
and leave ``good`` installed, verified and servable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, TargetFile
from tuf.api.serialization.json import JSONSerializer

from agent.daemon.catalog import verified_models
from registry.exceptions import Reason, RegistryError
from registry.metadata import METADATA_MAX_BYTES
from tests.registry.fleet import Box, Fleet, blob_file, meta_file, replace_file, rewrite_json

Attack = Callable[[Fleet, Box], Path]


def _resign(path: Path, edit: Callable[[Metadata[Any]], None]) -> None:
    md = Metadata.from_bytes(path.read_bytes())
    edit(md)
    replace_file(path, md.to_bytes(JSONSerializer(compact=False)))


def tampered_blob(f: Fleet, box: Box) -> Path:
    m = f.model("new")
    b = f.bundle()
    p = blob_file(b, m)
    data = bytearray(p.read_bytes())
    data[100] ^= 0x01
    replace_file(p, bytes(data))
    return b


def tampered_metadata(f: Fleet, box: Box) -> Path:
    f.model("new")
    b = f.bundle()
    rewrite_json(
        meta_file(b, "targets"), lambda d: d["signed"]["targets"]["models/new/1/model.gguf"].update(length=7)
    )
    return b


def unknown_key(f: Fleet, box: Box) -> Path:
    f.model("new")
    b = f.bundle()

    def sign_with_stranger(md: Metadata[Any]) -> None:
        md.signatures.clear()
        md.sign(CryptoSigner.generate_ed25519())

    _resign(meta_file(b, "targets"), sign_with_stranger)
    return b


def _two_targets_keys(f: Fleet, box: Box) -> None:
    f.repo.add_key("targets", threshold=2)
    box.import_bundle(f.bundle())  # the box now trusts root v2: targets needs 2 of 2


def below_threshold(f: Fleet, box: Box) -> Path:
    _two_targets_keys(f, box)
    f.model("new")
    b = f.bundle()

    def keep_one(md: Metadata[Any]) -> None:
        first = next(iter(md.signatures))
        md.signatures = {first: md.signatures[first]}

    _resign(meta_file(b, "targets"), keep_one)
    return b


def duplicate_signatures(f: Fleet, box: Box) -> Path:
    _two_targets_keys(f, box)
    f.model("new")
    b = f.bundle()
    rewrite_json(meta_file(b, "targets"), lambda d: d["signatures"].__setitem__(1, d["signatures"][0]))
    return b


def expired(role: str) -> Attack:
    def attack(f: Fleet, box: Box) -> Path:
        f.expire(**{role: -1})
        if role == "root":
            f.repo.rotate_root()
        elif role == "timestamp":
            f.repo.refresh_timestamp()
        else:
            f.model("new")
        return f.bundle()

    attack.__name__ = f"expired_{role}"
    return attack


def rollback_timestamp(f: Fleet, box: Box) -> Path:
    old = f.bundle()
    f.repo.refresh_timestamp()
    box.import_bundle(f.bundle())
    return old


def rollback_snapshot(f: Fleet, box: Box) -> Path:
    f.model("new")
    box.import_bundle(f.bundle())
    # The timestamp key signs a fresh timestamp that points to the previous snapshot.
    previous = f.repo.snapshot.signed.version - 1
    f.repo.snapshot = Metadata.from_file(str(f.repo.path / "metadata" / f"{previous}.snapshot.json"))
    f.repo.refresh_timestamp()
    return f.bundle()


def rollback_targets(f: Fleet, box: Box) -> Path:
    f.model("new")
    box.import_bundle(f.bundle())
    # Snapshot and timestamp keys sign a fresh snapshot that lists the previous targets.
    previous = f.repo.targets.signed.version - 1
    f.repo.targets = Metadata.from_file(str(f.repo.path / "metadata" / f"{previous}.targets.json"))
    f.repo.publish_snapshot()
    return f.bundle()


def rollback_root(f: Fleet, box: Box) -> Path:
    # Root v2 keeps the root keys (it replaces the targets key), so root v1 is still validly
    # signed by them: only the version check stands between the box and the old root.
    f.repo.revoke_key("targets")
    box.import_bundle(f.bundle())
    b = f.bundle()
    (b / "metadata" / "3.root.json").write_bytes((b / "metadata" / "1.root.json").read_bytes())
    return b


def root_skips_a_version(f: Fleet, box: Box) -> Path:
    f.repo.rotate_root()
    f.repo.rotate_root()
    b = f.bundle()
    replace_file(b / "metadata" / "2.root.json", (b / "metadata" / "3.root.json").read_bytes())
    return b


def root_without_old_signatures(f: Fleet, box: Box) -> Path:
    f.repo.rotate_root()
    b = f.bundle()

    def only_new_keys(md: Metadata[Any]) -> None:
        new = set(md.signed.roles["root"].keyids)
        md.signatures = {k: s for k, s in md.signatures.items() if k in new}

    _resign(b / "metadata" / "2.root.json", only_new_keys)
    return b


def _previous_version_under_the_current_name(f: Fleet, role: str) -> Path:
    """A bundle whose current ``role`` file holds the previous version's (validly signed) bytes."""
    f.model("new")
    b = f.bundle()
    current = (f.repo.snapshot if role == "snapshot" else f.repo.targets).signed.version
    older = (f.repo.path / "metadata" / f"{current - 1}.{role}.json").read_bytes()
    replace_file(b / "metadata" / f"{current}.{role}.json", older)
    return b


def mix_and_match_snapshot(f: Fleet, box: Box) -> Path:
    return _previous_version_under_the_current_name(f, "snapshot")


def mix_and_match_targets(f: Fleet, box: Box) -> Path:
    return _previous_version_under_the_current_name(f, "targets")


def endless_metadata(f: Fleet, box: Box) -> Path:
    f.repo.refresh_timestamp()
    b = f.bundle()
    p = meta_file(b, "timestamp")
    replace_file(p, p.read_bytes() + b" " * (METADATA_MAX_BYTES["timestamp"] + 1))
    return b


def blob_longer_than_signed(f: Fleet, box: Box) -> Path:
    m = f.model("new")
    b = f.bundle()
    p = blob_file(b, m)
    replace_file(p, p.read_bytes() + b"more bytes than were signed")
    return b


def missing_blob(f: Fleet, box: Box) -> Path:
    m = f.model("new")
    b = f.bundle()
    blob_file(b, m).unlink()
    return b


def metadata_bundle(f: Fleet) -> Path:
    """A hand-made bundle of the current metadata (the hub's exporter refuses unsafe paths)."""
    dest = f.dir / "hand-made"
    meta = f.repo.path / "metadata"
    names = [p.name for p in meta.glob("*.root.json") if p.name[0].isdigit()]
    names += ["timestamp.json", f"{f.repo.snapshot.signed.version}.snapshot.json"]
    names.append(f"{f.repo.targets.signed.version}.targets.json")
    (dest / "metadata").mkdir(parents=True)
    for name in names:
        (dest / "metadata" / name).write_bytes((meta / name).read_bytes())
    return dest


def bad_path(path: str) -> Attack:
    def attack(f: Fleet, box: Box) -> Path:
        # A compromised (or buggy) hub signs a target with an unsafe path.
        f.repo.targets.signed.targets[path] = TargetFile(
            5, {"sha256": "0" * 64}, path, {"custom": {"kind": "policy"}}
        )
        f.repo.publish()
        return metadata_bundle(f)

    return attack


CASES: list[tuple[str, Attack, Reason]] = [
    ("tampered-blob", tampered_blob, Reason.BLOB_HASH_MISMATCH),
    ("tampered-metadata", tampered_metadata, Reason.BAD_SIGNATURE),
    ("signature-by-unknown-key", unknown_key, Reason.UNKNOWN_KEY),
    ("fewer-signatures-than-threshold", below_threshold, Reason.THRESHOLD),
    ("duplicate-signatures-count-once", duplicate_signatures, Reason.THRESHOLD),
    ("expired-timestamp", expired("timestamp"), Reason.EXPIRED),
    ("expired-snapshot", expired("snapshot"), Reason.EXPIRED),
    ("expired-targets", expired("targets"), Reason.EXPIRED),
    ("expired-root", expired("root"), Reason.EXPIRED),
    ("rollback-timestamp", rollback_timestamp, Reason.ROLLBACK),
    ("rollback-snapshot", rollback_snapshot, Reason.ROLLBACK),
    ("rollback-targets", rollback_targets, Reason.ROLLBACK),
    ("rollback-root", rollback_root, Reason.ROLLBACK),
    ("root-rotation-skips-a-version", root_skips_a_version, Reason.ROOT_ROTATION),
    ("root-rotation-without-old-keys", root_without_old_signatures, Reason.ROOT_ROTATION),
    ("mix-and-match-snapshot", mix_and_match_snapshot, Reason.MIX_AND_MATCH),
    ("mix-and-match-targets", mix_and_match_targets, Reason.MIX_AND_MATCH),
    ("endless-metadata", endless_metadata, Reason.METADATA_TOO_LARGE),
    ("blob-longer-than-signed", blob_longer_than_signed, Reason.BLOB_TOO_LONG),
    ("path-dotdot", bad_path("models/../../etc/passwd"), Reason.BAD_PATH),
    ("path-absolute", bad_path("/etc/passwd"), Reason.BAD_PATH),
    ("path-space", bad_path("models/a b/1/model.gguf"), Reason.BAD_PATH),
    ("path-hidden-file", bad_path("policies/.hidden.json"), Reason.BAD_PATH),
    ("path-backslash", bad_path("models/x/1/..\\..\\model.gguf"), Reason.BAD_PATH),
    ("path-non-ascii", bad_path("models/x/1/mödel.gguf"), Reason.BAD_PATH),
    ("path-unknown-area", bad_path("bin/sh"), Reason.BAD_PATH),
    ("bundle-missing-a-blob", missing_blob, Reason.MISSING),
]


@pytest.fixture
def fleet_and_box(tmp_path: Path) -> tuple[Fleet, Box]:
    fleet = Fleet(tmp_path)
    fleet.model("good")
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    assert box.model_ids() == ["good"]
    return fleet, box


@pytest.mark.parametrize(("attack", "reason"), [(a, r) for _, a, r in CASES], ids=[c[0] for c in CASES])
def test_attack_is_refused_and_good_model_still_served(
    fleet_and_box: tuple[Fleet, Box], attack: Attack, reason: Reason
) -> None:
    fleet, box = fleet_and_box
    bundle = attack(fleet, box)
    installed_before = box.model_ids()
    assert "good" in installed_before
    refusals_before = len(box.refusals)

    with pytest.raises(RegistryError) as info:
        box.import_bundle(bundle)

    assert info.value.reason is reason, str(info.value)
    assert str(info.value).startswith(f"{reason.value}: ")
    assert box.refusals[refusals_before:] == [(reason.value, info.value.detail)]
    assert box.model_ids() == installed_before
    served = verified_models(box.registry)
    assert [s.info.id for s in served] == installed_before
    assert box.registry.verify().bad == ()


def test_the_table_names_every_reason_it_claims() -> None:
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names))
    covered = {r for _, _, r in CASES}
    required = {
        Reason.BLOB_HASH_MISMATCH,
        Reason.BAD_SIGNATURE,
        Reason.UNKNOWN_KEY,
        Reason.THRESHOLD,
        Reason.EXPIRED,
        Reason.ROLLBACK,
        Reason.ROOT_ROTATION,
        Reason.MIX_AND_MATCH,
        Reason.METADATA_TOO_LARGE,
        Reason.BLOB_TOO_LONG,
        Reason.BAD_PATH,
        Reason.MISSING,
    }
    assert required <= covered
