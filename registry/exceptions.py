"""The registry's one error tree.

    RegistryError                 root; every error has a ``reason`` (a :class:`Reason` value)
    ├── ManifestError             a manifest, deployment or policy document is malformed
    ├── Refused                   verification refused metadata or a blob (an attack or a fault)
    ├── BundleError               a bundle cannot be read (not a directory/tar, unreadable)
    ├── StoreError                the local blob store failed (I/O)
    │   └── StoreFull             no space left (or the file size limit was hit) while installing
    ├── NotEnrolled               the device has no trust anchor yet (``edge-agent enroll``)
    └── RepositoryError           hub side: repository layout, keys, passphrases, signing

Every error carries a machine-readable ``reason`` (a :class:`Reason`, a ``str`` enum) and a
one-line human ``detail``; ``str(err)`` is ``"<reason>: <detail>"``, so a refusal printed by the
CLI always names why. python-tuf's and the OS's exceptions are translated into these at the edge
that calls them (:mod:`registry.trust`, :mod:`registry.store`), never leaked.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why something was refused or failed. Stable strings: they go to the audit log."""

    # signatures
    BAD_SIGNATURE = "bad_signature"
    """A signature by a trusted key does not verify: the signed bytes were altered."""
    UNKNOWN_KEY = "unknown_key"
    """Signed only by keys the delegating role does not list."""
    THRESHOLD = "threshold_not_met"
    """Fewer valid signatures by distinct trusted keys than the role's threshold."""
    # freshness and consistency
    EXPIRED = "expired"
    ROLLBACK = "rollback"
    ROOT_ROTATION = "root_rotation"
    """A new root skips a version or is not signed by the old root's keys."""
    MIX_AND_MATCH = "mix_and_match"
    """Snapshot/timestamp do not match the metadata they describe."""
    # sizes and contents
    METADATA_TOO_LARGE = "metadata_too_large"
    BLOB_TOO_LONG = "blob_too_long"
    BLOB_HASH_MISMATCH = "blob_hash_mismatch"
    BLOB_TOO_SHORT = "blob_too_short"
    BAD_PATH = "bad_path"
    MALFORMED = "malformed"
    UNKNOWN_TARGET = "unknown_target"
    # bundle, store, device
    MISSING = "missing"
    BUNDLE_UNREADABLE = "bundle_unreadable"
    DISK_FULL = "disk_full"
    IO_ERROR = "io_error"
    NOT_ENROLLED = "not_enrolled"
    NOT_INSTALLED = "not_installed"
    REPOSITORY = "repository"


class RegistryError(Exception):
    """Root of every error the registry raises on purpose."""

    default_reason: Reason = Reason.IO_ERROR

    def __init__(self, detail: str, *, reason: Reason | None = None) -> None:
        self.reason: Reason = reason if reason is not None else self.default_reason
        self.detail = detail
        super().__init__(f"{self.reason.value}: {detail}")


class ManifestError(RegistryError):
    """A manifest, deployment or policy document does not have the required shape."""

    default_reason = Reason.MALFORMED


class Refused(RegistryError):
    """Verification refused something. ``reason`` says which rule; ``detail`` what was seen."""

    default_reason = Reason.BAD_SIGNATURE


class BundleError(RegistryError):
    """A bundle is not a readable directory or tar file."""

    default_reason = Reason.BUNDLE_UNREADABLE


class StoreError(RegistryError):
    """The local store could not be read or written."""

    default_reason = Reason.IO_ERROR


class StoreFull(StoreError):
    """No space left on the device (or RLIMIT_FSIZE) while writing a blob; nothing was installed."""

    default_reason = Reason.DISK_FULL


class NotEnrolled(RegistryError):
    """The device has no trusted root yet."""

    default_reason = Reason.NOT_ENROLLED


class RepositoryError(RegistryError):
    """Hub side: the repository directory, its keys or its signing failed."""

    default_reason = Reason.REPOSITORY


__all__ = [
    "BundleError",
    "ManifestError",
    "NotEnrolled",
    "Reason",
    "Refused",
    "RegistryError",
    "RepositoryError",
    "StoreError",
    "StoreFull",
]
