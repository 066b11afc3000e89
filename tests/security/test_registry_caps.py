"""What remained of crafted bundles (issue 15, medium #9): a tar with endless entries, oversized
signed manifests, metadata left trusted by a refused import, a sha256 that is not hex. Real signed
repositories (tests/registry/fleet.py), real bundles."""

from __future__ import annotations

import io
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
from tuf.api.metadata import TargetFile

from registry.exceptions import BundleError, ManifestError, Reason, RegistryError
from registry.fetch import MAX_BUNDLE_ENTRIES, BundleFetcher
from registry.metadata import CUSTOM_MAX_BYTES
from tests.registry.fleet import Box, Fleet
from tests.registry.test_attacks import metadata_bundle


@pytest.fixture
def fleet_and_box(tmp_path: Path) -> tuple[Fleet, Box]:
    fleet = Fleet(tmp_path)
    fleet.model("good")
    box = fleet.box()
    box.import_bundle(fleet.bundle())
    return fleet, box


def tar_with_junk(directory: Path, dest: Path, junk: int) -> Path:
    """The bundle ``directory`` as a tar, followed by ``junk`` empty entries outside its areas."""
    with tarfile.open(dest, "w") as tar:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(directory)))
        for i in range(junk):
            info = tarfile.TarInfo(f"junk/{i}")
            tar.addfile(info, io.BytesIO(b""))
    return dest


def test_a_tar_with_more_entries_than_the_cap_is_refused_at_once(fleet_and_box: tuple[Fleet, Box]) -> None:
    fleet, box = fleet_and_box
    bundle = tar_with_junk(fleet.bundle(), fleet.dir / "endless.tar", MAX_BUNDLE_ENTRIES + 1)
    started = time.monotonic()
    with pytest.raises(BundleError, match="more than"):
        box.import_bundle(bundle)
    assert time.monotonic() - started < 10
    assert box.model_ids() == ["good"]


def test_entries_outside_the_bundle_areas_are_not_kept_in_memory(fleet_and_box: tuple[Fleet, Box]) -> None:
    fleet, box = fleet_and_box
    bundle = tar_with_junk(fleet.bundle(), fleet.dir / "junk.tar", MAX_BUNDLE_ENTRIES - 200)
    tracemalloc.start()
    try:
        with BundleFetcher(bundle) as fetcher:
            _, peak = tracemalloc.get_traced_memory()
            assert len(fetcher._members) < 50  # metadata and targets only
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # ~20,000 headers read, a few MB at most
    box.import_bundle(bundle)  # and the bundle itself still imports
    assert box.model_ids() == ["good"]


def signed_target(fleet: Fleet, path: str, sha: str, custom: dict[str, object]) -> None:
    """A compromised (or buggy) hub signs whatever it likes: bypass the publishing checks."""
    fleet.repo.targets.signed.targets[path] = TargetFile(5, {"sha256": sha}, path, {"custom": custom})
    fleet.repo.publish()


CRAFTED = [
    pytest.param(
        "policies/big.json",
        "0" * 64,
        {"kind": "policy", "pad": "x" * (CUSTOM_MAX_BYTES + 1)},
        Reason.METADATA_TOO_LARGE,
        id="manifest-over-the-cap",
    ),
    pytest.param("policies/p.json", "g" * 64, {"kind": "policy"}, Reason.MALFORMED, id="sha256-not-hex"),
    pytest.param("models/../../x", "0" * 64, {"kind": "policy"}, Reason.BAD_PATH, id="bad-path"),
]


@pytest.mark.parametrize(("path", "sha", "custom", "reason"), CRAFTED)
def test_a_refused_import_leaves_the_trusted_metadata_as_it_was(
    fleet_and_box: tuple[Fleet, Box], path: str, sha: str, custom: dict[str, object], reason: Reason
) -> None:
    """Refused with its own reason, and python-tuf's freshly persisted metadata is put back: a good
    bundle of the versions the box held before is still accepted (not a rollback)."""
    fleet, box = fleet_and_box
    fleet.model("second")
    good = fleet.bundle()  # targets v(N), good
    trusted = (box.registry.metadata_dir / "targets.json").read_bytes()
    signed_target(fleet, path, sha, custom)  # targets v(N+1), crafted
    with pytest.raises(RegistryError) as info:
        box.import_bundle(metadata_bundle(fleet))
    assert info.value.reason is reason, str(info.value)
    assert (box.registry.metadata_dir / "targets.json").read_bytes() == trusted
    box.import_bundle(good)
    assert box.model_ids() == ["good", "second"]


def test_the_publishing_side_refuses_an_oversized_manifest(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    with pytest.raises(ManifestError, match="above the cap"):
        fleet.repo.add_bytes("policies/p.json", b"{}", {"kind": "policy", "pad": "x" * CUSTOM_MAX_BYTES})
