"""Pure verdicts: python-tuf's exceptions named as refusals, trust anchors, signature diagnosis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.api.serialization import DeserializationError
from tuf.api.serialization.json import JSONSerializer

from registry.exceptions import Reason, Refused
from registry.trust import entries_from_targets, explain_signatures, refusal_for, role_of, verify_trust_anchor
from tests.registry.fleet import Fleet

NOW = datetime.now(UTC)
META = "registry:/metadata/"


@pytest.mark.parametrize(
    ("exc", "url", "reason"),
    [
        (tuf_exc.DownloadLengthMismatchError("too long"), META + "timestamp.json", Reason.METADATA_TOO_LARGE),
        (
            tuf_exc.DownloadLengthMismatchError("too long"),
            "registry:/targets/models/a/1/x.m",
            Reason.BLOB_TOO_LONG,
        ),
        (tuf_exc.DownloadHTTPError("nope", 404), META + "3.snapshot.json", Reason.MISSING),
        (tuf_exc.DownloadError("io"), META + "timestamp.json", Reason.BUNDLE_UNREADABLE),
        (tuf_exc.ExpiredMetadataError("timestamp.json is expired"), META + "timestamp.json", Reason.EXPIRED),
        (
            tuf_exc.BadVersionNumberError("New timestamp version 1 must be >= 2"),
            META + "timestamp.json",
            Reason.ROLLBACK,
        ),
        (
            tuf_exc.BadVersionNumberError("Expected targets.json version 1, got 2."),
            META + "4.snapshot.json",
            Reason.ROLLBACK,
        ),
        (
            tuf_exc.BadVersionNumberError("Expected snapshot version 3, got 2"),
            META + "3.snapshot.json",
            Reason.MIX_AND_MATCH,
        ),
        (
            tuf_exc.BadVersionNumberError("Expected targets v3, got v2."),
            META + "3.targets.json",
            Reason.MIX_AND_MATCH,
        ),
        (
            tuf_exc.BadVersionNumberError("Expected root version 2 instead got version 3"),
            META + "2.root.json",
            Reason.ROOT_ROTATION,
        ),
        (
            tuf_exc.BadVersionNumberError("Expected root version 3 instead got version 1"),
            META + "3.root.json",
            Reason.ROLLBACK,
        ),
        (tuf_exc.LengthOrHashMismatchError("hash"), META + "3.snapshot.json", Reason.MIX_AND_MATCH),
        (
            tuf_exc.UnsignedMetadataError("root was signed by 0/2 keys"),
            META + "2.root.json",
            Reason.ROOT_ROTATION,
        ),
        (
            tuf_exc.UnsignedMetadataError("targets was signed by 0/1 keys"),
            META + "3.targets.json",
            Reason.THRESHOLD,
        ),
        (
            tuf_exc.RepositoryError("New snapshot is missing info for 'targets.json'"),
            META + "3.snapshot.json",
            Reason.ROLLBACK,
        ),
        (DeserializationError("Failed to deserialize JSON"), META + "timestamp.json", Reason.MALFORMED),
    ],
    ids=[
        "endless-metadata",
        "endless-blob",
        "missing",
        "unreadable",
        "expired",
        "timestamp-rollback",
        "targets-rollback-in-snapshot",
        "snapshot-mismatch",
        "targets-mismatch",
        "root-skip",
        "root-rollback",
        "snapshot-hash",
        "root-unsigned",
        "targets-unsigned-unexplained",
        "role-removed",
        "garbage",
    ],
)
def test_refusal_names_the_rule(exc: Exception, url: str, reason: Reason) -> None:
    refused = refusal_for(exc, url)
    assert refused.reason is reason
    assert str(refused).startswith(f"{reason.value}: ")


@pytest.mark.parametrize(
    ("url", "role"),
    [
        (META + "2.root.json", "root"),
        (META + "timestamp.json", "timestamp"),
        ("registry:/targets/x/y", "blob"),
        (None, None),
    ],
)
def test_role_of(url: str | None, role: str | None) -> None:
    assert role_of(url) == role


def test_explain_signatures_tells_unknown_key_from_broken_signature(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    root = fleet.repo.root.signed
    good = fleet.repo.targets
    assert (
        explain_signatures("targets", good.to_bytes(JSONSerializer()), root) is Reason.THRESHOLD
    )  # it verifies
    stranger = Metadata.from_bytes(good.to_bytes())
    stranger.signatures.clear()
    stranger.sign(CryptoSigner.generate_ed25519())
    assert explain_signatures("targets", stranger.to_bytes(), root) is Reason.UNKNOWN_KEY
    altered = Metadata.from_bytes(good.to_bytes())
    altered.signed.version += 10
    assert explain_signatures("targets", altered.to_bytes(), root) is Reason.BAD_SIGNATURE
    unsigned = Metadata.from_bytes(good.to_bytes())
    unsigned.signatures.clear()
    assert explain_signatures("targets", unsigned.to_bytes(), root) is Reason.UNKNOWN_KEY
    assert explain_signatures("targets", b"{", root) is Reason.MALFORMED


def test_trust_anchor_rules(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    assert verify_trust_anchor(fleet.root_v1, NOW).version == 1
    with pytest.raises(Refused) as info:
        verify_trust_anchor(fleet.root_v1, NOW + timedelta(days=400))
    assert info.value.reason is Reason.EXPIRED
    md = Metadata[Root].from_bytes(fleet.root_v1)
    md.signed.consistent_snapshot = False
    md.signatures.clear()
    for signer in fleet.repo.signers("root"):
        md.sign(signer, append=True)
    with pytest.raises(Refused, match="consistent snapshots"):
        verify_trust_anchor(md.to_bytes(), NOW)
    targets = fleet.repo.targets.to_bytes()
    with pytest.raises(Refused) as info:
        verify_trust_anchor(targets, NOW)
    assert info.value.reason is Reason.MALFORMED


def test_target_entries_refuse_manifests_that_disagree_with_the_target(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    m = fleet.model("a")
    targets = dict(fleet.repo.targets.signed.targets)
    assert [e.manifest for e in entries_from_targets(targets)] == [m]
    wrong = TargetFile(m.file_size + 1, {"sha256": m.sha256}, m.target_path, {"custom": m.to_custom()})
    with pytest.raises(Refused, match="sha256/size differ") as info:
        entries_from_targets({m.target_path: wrong})
    assert info.value.reason is Reason.MALFORMED
    no_manifest = TargetFile(5, {"sha256": m.sha256}, m.target_path, {"custom": {"kind": "policy"}})
    with pytest.raises(Refused, match="without a manifest"):
        entries_from_targets({m.target_path: no_manifest})
    moved = TargetFile(m.file_size, {"sha256": m.sha256}, "models/b/1/model.gguf", {"custom": m.to_custom()})
    with pytest.raises(Refused, match="describes"):
        entries_from_targets({"models/b/1/model.gguf": moved})
