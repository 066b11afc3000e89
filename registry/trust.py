"""Pure verification: bytes in, verified objects (or a named refusal) out. No I/O here.

What this module decides, and on whose authority:
- Signatures, thresholds, versions, expiry and consistency of TUF metadata are checked by
  python-tuf (``Metadata.verify_delegate`` here for enrollment, ngclient's ``TrustedMetadataSet``
  through the ``Updater`` in :mod:`registry.device`). This module never re-implements them; it
  *names* their verdicts: :func:`refusal_for` maps python-tuf's exception (and which file was being
  loaded) to a :class:`Refused` with a stable :class:`Reason`, and :func:`explain_signatures`
  asks python-tuf's ``get_verification_result`` which keys signed, to tell an unknown key from a
  broken signature from a missing quorum.
- Blob contents: :class:`BlobVerifier` is fed the bytes as they stream in and refuses as soon as
  they exceed the signed length, and at the end unless the length and sha256 equal the signed ones.
- Target entries: :func:`entries_from_targets` turns verified targets metadata into typed entries,
  refusing the whole set if any path is unsafe or any custom field malformed.

Invariant: every function either returns a verified value or raises :class:`Refused`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.api.serialization import DeserializationError

from registry.exceptions import ManifestError, Reason, Refused
from registry.metadata import (
    CompanionFile,
    ModelManifest,
    TargetRef,
    check_custom_size,
    parse_target_path,
)

_SHA256 = re.compile(r"[0-9a-f]{64}")


def role_of(url: str | None) -> str | None:
    """``registry:/metadata/3.root.json`` -> ``root``; targets URLs -> ``blob``."""
    if url is None:
        return None
    if "/targets/" in url:
        return "blob"
    name = url.rsplit("/", 1)[-1].removesuffix(".json")
    return name.rsplit(".", 1)[-1] if "." in name else name


def explain_signatures(role: str, rejected: bytes, delegator: Root) -> Reason:
    """Which signature rule ``rejected`` (metadata of ``role``) breaks against ``delegator``."""
    try:
        md = Metadata[Any].from_bytes(rejected)
    except DeserializationError:
        return Reason.MALFORMED
    if role not in delegator.roles:
        return Reason.UNKNOWN_KEY
    result = delegator.get_verification_result(role, md.signed_bytes, md.signatures)
    if result.verified:
        return Reason.THRESHOLD  # verified against this delegator: the other one refused it
    known = set(delegator.roles[role].keyids)
    signers = set(md.signatures)
    if not signers & known:
        return Reason.UNKNOWN_KEY
    if (signers & known) - set(result.signed):
        return Reason.BAD_SIGNATURE
    return Reason.THRESHOLD


def refusal_for(
    exc: BaseException,
    url: str | None,
    *,
    rejected: bytes | None = None,
    trusted_root: Root | None = None,
) -> Refused:
    """Name python-tuf's verdict. ``url`` is the file being loaded when ``exc`` was raised,
    ``rejected`` its bytes (if known) and ``trusted_root`` the root trusted at that moment."""
    if isinstance(exc, Refused):
        return exc
    role = role_of(url) or "metadata"
    text = str(exc) or type(exc).__name__
    where = f"{role}: {text}"
    if isinstance(exc, tuf_exc.DownloadLengthMismatchError):
        reason = Reason.BLOB_TOO_LONG if role == "blob" else Reason.METADATA_TOO_LARGE
        return Refused(where, reason=reason)
    if isinstance(exc, tuf_exc.DownloadHTTPError):
        return Refused(f"{url} is missing from the source", reason=Reason.MISSING)
    if isinstance(exc, tuf_exc.DownloadError):
        return Refused(f"{url}: cannot be read: {exc.__cause__ or exc}", reason=Reason.BUNDLE_UNREADABLE)
    if isinstance(exc, tuf_exc.ExpiredMetadataError):
        return Refused(where, reason=Reason.EXPIRED)
    if isinstance(exc, tuf_exc.BadVersionNumberError):
        if role == "root":
            numbers = [int(n) for n in re.findall(r"\d+", text)]
            if len(numbers) == 2 and numbers[1] < numbers[0]:
                return Refused(f"root: {text} (rollback)", reason=Reason.ROLLBACK)
            return Refused(f"root rotation refused: {text}", reason=Reason.ROOT_ROTATION)
        if "must be >=" in text or (role == "snapshot" and ".json version" in text):
            return Refused(f"{where} (rollback)", reason=Reason.ROLLBACK)
        return Refused(
            f"{where} (does not match what the snapshot/timestamp names)", reason=Reason.MIX_AND_MATCH
        )
    if isinstance(exc, tuf_exc.LengthOrHashMismatchError):
        return Refused(
            f"{where} (does not match the hash its parent role signed)", reason=Reason.MIX_AND_MATCH
        )
    if isinstance(exc, tuf_exc.UnsignedMetadataError):
        if role == "root":
            return Refused(
                f"root rotation refused: {text} (a new root needs the old root's and its own threshold)",
                reason=Reason.ROOT_ROTATION,
            )
        reason = Reason.THRESHOLD
        if rejected is not None and trusted_root is not None:
            reason = explain_signatures(role, rejected, trusted_root)
        return Refused(where, reason=reason)
    if isinstance(exc, DeserializationError | tuf_exc.RepositoryError):
        cause = f"{text} {exc.__cause__ or ''}".lower()
        if "multiple signatures" in cause:
            return Refused(f"{where} (duplicate signatures from one key count once)", reason=Reason.THRESHOLD)
        if "missing info" in cause:
            return Refused(f"{where} (rollback: a role disappeared)", reason=Reason.ROLLBACK)
        detail = f"{where}: {exc.__cause__}" if exc.__cause__ else where
        return Refused(detail, reason=Reason.MALFORMED)
    return Refused(where, reason=Reason.MALFORMED)


def verify_trust_anchor(data: bytes, now: datetime) -> Root:
    """Check bytes meant as a device's trusted root: parseable root metadata, signed by its own
    threshold of keys, with consistent snapshots, not expired. Returns the root."""
    try:
        md = Metadata[Root].from_bytes(data)
    except DeserializationError as exc:
        raise Refused(f"trust anchor is not root metadata: {exc}", reason=Reason.MALFORMED) from None
    if not isinstance(md.signed, Root):
        raise Refused("trust anchor is not root metadata", reason=Reason.MALFORMED)
    try:
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
    except tuf_exc.UnsignedMetadataError as exc:
        raise Refused(f"trust anchor: {exc}", reason=explain_signatures(Root.type, data, md.signed)) from None
    if md.signed.is_expired(now):
        raise Refused(f"trust anchor expired at {md.signed.expires.isoformat()}", reason=Reason.EXPIRED)
    if not md.signed.consistent_snapshot:
        raise Refused("trust anchor does not use consistent snapshots", reason=Reason.MALFORMED)
    return md.signed


class BlobVerifier:
    """Streaming check of one blob against its signed length and sha256.

    ``update`` refuses (``blob_too_long``) the moment more bytes arrive than were signed, so an
    endless blob never fills the disk; ``finish`` refuses a short or altered blob."""

    def __init__(self, name: str, length: int, sha256: str) -> None:
        self.name = name
        self.length = length
        self.sha256 = sha256
        self.received = 0
        self._hash = hashlib.sha256()

    def update(self, block: bytes | memoryview) -> None:
        self.received += len(block)
        if self.received > self.length:
            raise Refused(
                f"{self.name}: more than the signed {self.length} bytes", reason=Reason.BLOB_TOO_LONG
            )
        self._hash.update(block)

    def finish(self) -> None:
        if self.received < self.length:
            raise Refused(
                f"{self.name}: {self.received} bytes, the signed length is {self.length}",
                reason=Reason.BLOB_TOO_SHORT,
            )
        digest = self._hash.hexdigest()
        if digest != self.sha256:
            raise Refused(
                f"{self.name}: sha256 {digest[:16]}... does not match the signed {self.sha256[:16]}...",
                reason=Reason.BLOB_HASH_MISMATCH,
            )


@dataclass(frozen=True, slots=True)
class TargetEntry:
    """One verified target: where it goes, what it is."""

    ref: TargetRef
    length: int
    sha256: str
    custom: Mapping[str, Any]
    manifest: ModelManifest | None = None
    companion: CompanionFile | None = None

    @property
    def path(self) -> str:
        return self.ref.path


def entries_from_targets(targets: Mapping[str, TargetFile]) -> list[TargetEntry]:
    """Typed entries of verified targets (path -> TargetFile); any unsafe path or bad custom
    refuses all of them."""
    out: list[TargetEntry] = []
    for path, target in sorted(targets.items()):
        if target.path != path:
            raise Refused(f"target {path!r} names itself {target.path!r}", reason=Reason.BAD_PATH)
        ref = parse_target_path(path)
        sha = target.hashes.get("sha256")
        if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
            raise Refused(
                f"target {path!r} has no sha256 of 64 lowercase hex digits", reason=Reason.MALFORMED
            )
        custom = dict(target.custom or {})
        try:
            check_custom_size(path, custom)
        except ManifestError as exc:
            raise Refused(exc.detail, reason=Reason.METADATA_TOO_LARGE) from None
        manifest = companion = None
        try:
            if ref.kind == "model":
                if custom.get("kind") == "model":
                    manifest = ModelManifest.from_custom(custom)
                    if manifest.target_path != path:
                        raise ManifestError(f"manifest describes {manifest.target_path}, not {path}")
                    if (manifest.sha256, manifest.file_size) != (sha, target.length):
                        raise ManifestError("manifest sha256/size differ from the target's")
                elif custom.get("kind") == "model_file":
                    companion = CompanionFile.from_custom(custom)
                    if companion.target_path != path or companion.sha256 != sha:
                        raise ManifestError("model file custom does not describe this target")
                else:
                    raise ManifestError("model target without a manifest")
        except ManifestError as exc:
            raise Refused(f"target {path!r}: {exc.detail}", reason=Reason.MALFORMED) from None
        out.append(TargetEntry(ref, target.length, sha, custom, manifest, companion))
    return out


__all__ = [
    "BlobVerifier",
    "TargetEntry",
    "entries_from_targets",
    "explain_signatures",
    "refusal_for",
    "role_of",
    "verify_trust_anchor",
]
