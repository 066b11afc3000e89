"""A hub's TUF repository on disk: keys, signed metadata, target files, bundles.

Layout of a repository directory::

    repo.json                     settings (threshold, passphrase variable name, chunk size)
    keys/<keyid>.pem              private Ed25519 keys, 0600 in a 0700 directory
    metadata/<N>.root.json        every root version (a client walks them one by one)
    metadata/<N>.snapshot.json    consistent snapshots ...
    metadata/<N>.targets.json
    metadata/timestamp.json
    metadata/{root,snapshot,targets}.json   the current version of each, for the hub itself
    targets/<dir>/<sha256>.<name> target files, named by hash (consistent snapshots)

Invariants: every metadata write is atomic; a publish writes targets, then snapshot, then
timestamp, so a reader that starts from ``timestamp.json`` always finds a consistent set; every
role is signed by python-tuf's Metadata API with securesystemslib signers, nothing here computes
or checks a signature itself. Versions only grow.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from registry.exceptions import RepositoryError
from registry.files import atomic_write, fsync_dir, read_bounded, temp_name, translate_os_error
from registry.keys import KeyStore, generate
from registry.metadata import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_EXPIRY,
    METADATA_MAX_BYTES,
    check_custom_size,
    parse_target_path,
)

CONFIG_NAME = "repo.json"
ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
_SERIALIZER = JSONSerializer(compact=False)


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True, slots=True)
class RepoSettings:
    root_threshold: int = 1
    passphrase_env: str | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    expiry_days: Mapping[str, float] | None = None

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "root_threshold": self.root_threshold,
                "passphrase_env": self.passphrase_env,
                "chunk_size": self.chunk_size,
                "expiry_days": dict(self.expiry_days or {}),
            },
            indent=2,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> RepoSettings:
        try:
            data = json.loads(raw)
            return cls(
                root_threshold=int(data["root_threshold"]),
                passphrase_env=data.get("passphrase_env"),
                chunk_size=int(data.get("chunk_size", DEFAULT_CHUNK_SIZE)),
                expiry_days=dict(data.get("expiry_days") or {}),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise RepositoryError(f"{CONFIG_NAME} is not valid: {exc}") from None


@dataclass(frozen=True, slots=True)
class PublishedTarget:
    path: str
    length: int
    sha256: str
    custom: Mapping[str, Any]


class Repository:
    """An open repository. Load with :meth:`open`, create with :meth:`init`."""

    def __init__(
        self,
        path: Path,
        settings: RepoSettings,
        keys: KeyStore,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.path = path
        self.settings = settings
        self.keys = keys
        self.now = now
        self.root: Metadata[Root] = self._read_current(Root)
        self.targets: Metadata[Targets] = self._read_current(Targets)
        self.snapshot: Metadata[Snapshot] = self._read_current(Snapshot)
        self.timestamp: Metadata[Timestamp] = self._read_current(Timestamp)

    # --- creation and loading ----------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: Path,
        *,
        root_threshold: int = 1,
        root_keys: int = 1,
        passphrase: bytes | None = None,
        passphrase_env: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        now: Callable[[], datetime] = utcnow,
    ) -> Repository:
        """Create keys and version 1 of every role; refuse a directory that already has a repo."""
        if not 1 <= root_threshold <= root_keys <= 16:
            raise RepositoryError(f"need 1 <= threshold ({root_threshold}) <= root keys ({root_keys}) <= 16")
        if (path / CONFIG_NAME).exists():
            raise RepositoryError(f"{path} already holds a repository")
        settings = RepoSettings(root_threshold, passphrase_env, chunk_size)
        keys = KeyStore(path / "keys", passphrase)
        created = now()
        root = Root(expires=created + DEFAULT_EXPIRY["root"], consistent_snapshot=True)
        root_signers = [generate() for _ in range(root_keys)]
        role_signers: dict[str, CryptoSigner] = {r: generate() for r in ("targets", "snapshot", "timestamp")}
        for s in root_signers:
            root.add_key(s.public_key, Root.type)
        root.roles[Root.type].threshold = root_threshold
        for role, s in role_signers.items():
            root.add_key(s.public_key, role)
        for s in [*root_signers, *role_signers.values()]:
            keys.save(s)
        (path / "metadata").mkdir(parents=True, exist_ok=True)
        (path / "targets").mkdir(parents=True, exist_ok=True)
        targets = Targets(expires=created + DEFAULT_EXPIRY["targets"])
        snapshot = Snapshot(expires=created + DEFAULT_EXPIRY["snapshot"])
        timestamp = Timestamp(expires=created + DEFAULT_EXPIRY["timestamp"])
        root_md = Metadata(root)
        for s in root_signers:
            root_md.sign(s, append=True)
        _write_metadata(path, root_md, versioned=True)
        targets_md = Metadata(targets)
        targets_md.sign(role_signers["targets"])
        _write_metadata(path, targets_md, versioned=True)
        snapshot.meta["targets.json"] = MetaFile(version=targets.version)
        snapshot_md = Metadata(snapshot)
        snapshot_md.sign(role_signers["snapshot"])
        _write_metadata(path, snapshot_md, versioned=True)
        timestamp.snapshot_meta = _meta_for(snapshot_md)
        timestamp_md = Metadata(timestamp)
        timestamp_md.sign(role_signers["timestamp"])
        _write_metadata(path, timestamp_md, versioned=False)
        atomic_write(path / CONFIG_NAME, settings.to_json())
        return cls(path, settings, keys, now)

    @classmethod
    def open(
        cls, path: Path, passphrase: bytes | None = None, now: Callable[[], datetime] = utcnow
    ) -> Repository:
        config = path / CONFIG_NAME
        if not config.is_file():
            raise RepositoryError(f"{path} is not a repository (no {CONFIG_NAME}; run `edge-hub repo init`)")
        settings = RepoSettings.from_json(read_bounded(config, 1 << 16))
        return cls(path, settings, KeyStore(path / "keys", passphrase), now)

    def _read_current(self, cls: type[Signed]) -> Any:
        name = f"{cls.type}.json"
        raw = read_bounded(self.path / "metadata" / name, METADATA_MAX_BYTES[cls.type])
        try:
            md = Metadata.from_bytes(raw)
        except Exception as exc:
            raise RepositoryError(f"metadata/{name} cannot be parsed: {exc}") from None
        if not isinstance(md.signed, cls):
            raise RepositoryError(f"metadata/{name} is not {cls.type} metadata")
        return md

    # --- signing -----------------------------------------------------------------------------

    def expiry(self, role: str) -> datetime:
        days = (self.settings.expiry_days or {}).get(role)
        delta = timedelta(days=days) if days is not None else DEFAULT_EXPIRY[role]
        return self.now() + delta

    def signers(self, role: str, root: Root | None = None) -> list[Signer]:
        """Signers for every key of ``role`` that this repository holds."""
        root = root or self.root.signed
        out: list[Signer] = []
        for keyid in root.roles[role].keyids:
            if self.keys.has(keyid):
                out.append(self.keys.load(cast(Any, root.get_key(keyid))))
        return out

    def _sign(self, md: Metadata[Any], role: str, root: Root | None = None) -> None:
        signers = self.signers(role, root)
        threshold = (root or self.root.signed).roles[role].threshold
        if len(signers) < threshold:
            raise RepositoryError(
                f"{role} needs {threshold} signatures but only {len(signers)} of its keys are here"
            )
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)

    def _sign_next(self, md: Metadata[Any]) -> None:
        """Sign ``md`` (its content already updated) as its next version with a fresh expiry, and
        write it (by version too, except the timestamp, which clients always fetch by name)."""
        role = md.signed.type
        md.signed.version += 1
        md.signed.expires = self.expiry(role)
        self._sign(md, role)
        _write_metadata(self.path, md, versioned=role != Timestamp.type)

    def publish(self) -> None:
        """Sign a new targets version, then snapshot, then timestamp."""
        self._sign_next(self.targets)
        self.publish_snapshot()

    def publish_snapshot(self) -> None:
        """Sign a new snapshot of the current targets version, then a new timestamp."""
        self.snapshot.signed.meta["targets.json"] = MetaFile(version=self.targets.signed.version)
        self._sign_next(self.snapshot)
        self.refresh_timestamp()

    def refresh_timestamp(self) -> None:
        """Re-sign the timestamp with a new version and expiry (run on a schedule)."""
        self.timestamp.signed.snapshot_meta = _meta_for(self.snapshot)
        self._sign_next(self.timestamp)

    def _republish(self, role: str) -> None:
        """Re-sign ``role``'s metadata and what depends on it after its keys changed in a new root."""
        if role == Targets.type:
            self.publish()
        elif role == Snapshot.type:
            self.publish_snapshot()
        elif role == Timestamp.type:
            self.refresh_timestamp()

    # --- targets -----------------------------------------------------------------------------

    def _target_file_path(self, target_path: str, sha256: str) -> Path:
        directory, _, name = target_path.rpartition("/")
        return self.path / "targets" / directory / f"{sha256}.{name}"

    def add_file(
        self, target_path: str, source: Path, sha256: str, custom: Mapping[str, Any]
    ) -> PublishedTarget:
        """Copy ``source`` into the repository as ``target_path`` (not yet published: call
        :meth:`publish`). ``sha256`` must be the file's digest (computed by the caller, who also
        needs it for the manifest); the copy is re-hashed by python-tuf and refused on mismatch."""
        parse_target_path(target_path)
        check_custom_size(target_path, custom)
        dest = self._target_file_path(target_path, sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.is_file():
            tmp = temp_name(dest.parent)
            try:
                shutil.copyfile(source, tmp)
                with tmp.open("rb") as fh:
                    os.fsync(fh.fileno())
                tmp.replace(dest)
                fsync_dir(dest.parent)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise translate_os_error(exc, f"cannot copy {source}") from None
        target = TargetFile.from_file(target_path, str(dest), ["sha256"])
        if target.hashes["sha256"] != sha256:
            dest.unlink(missing_ok=True)
            raise RepositoryError(f"{source} changed while it was being added (sha256 differs)")
        target.unrecognized_fields["custom"] = dict(custom)
        self.targets.signed.targets[target_path] = target
        return PublishedTarget(target_path, target.length, sha256, dict(custom))

    def add_bytes(self, target_path: str, data: bytes, custom: Mapping[str, Any]) -> PublishedTarget:
        """Add a small document (policy, deployment) as a target."""
        sha = hashlib.sha256(data).hexdigest()
        parse_target_path(target_path)
        check_custom_size(target_path, custom)
        dest = self._target_file_path(target_path, sha)
        if not dest.is_file():
            atomic_write(dest, data)
        target = TargetFile(len(data), {"sha256": sha}, target_path, {"custom": dict(custom)})
        self.targets.signed.targets[target_path] = target
        return PublishedTarget(target_path, len(data), sha, dict(custom))

    def read_target(self, target_path: str, limit: int) -> bytes | None:
        target = self.targets.signed.targets.get(target_path)
        if target is None:
            return None
        return read_bounded(self._target_file_path(target_path, target.hashes["sha256"]), limit)

    def remove_target(self, target_path: str) -> bool:
        return self.targets.signed.targets.pop(target_path, None) is not None

    def published(self) -> list[PublishedTarget]:
        return [
            PublishedTarget(p, t.length, t.hashes["sha256"], dict(t.custom or {}))
            for p, t in sorted(self.targets.signed.targets.items())
        ]

    # --- keys --------------------------------------------------------------------------------

    def _publish_root(self, new_root: Root, old_root: Root, new_signers: Iterable[Signer] = ()) -> None:
        """Sign ``new_root`` (version already bumped) by the old root's keys and its own."""
        new_root.expires = self.expiry("root")
        md = Metadata(new_root)
        signed_by: set[str] = set()
        old = self.signers(Root.type, old_root)
        if len(old) < old_root.roles[Root.type].threshold:
            raise RepositoryError("not enough of the current root keys are here to sign a new root")
        for s in [*old, *self.signers(Root.type, new_root), *new_signers]:
            if s.public_key.keyid not in signed_by:
                md.sign(s, append=True)
                signed_by.add(s.public_key.keyid)
        try:
            new_root.verify_delegate(Root.type, md.signed_bytes, md.signatures)
            old_root.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        except Exception as exc:
            raise RepositoryError(f"new root would not verify: {exc}") from None
        _write_metadata(self.path, md, versioned=True)
        self.root = md

    def rotate_root(self, *, keys: int | None = None, threshold: int | None = None) -> list[str]:
        """Replace every root key by new ones (signed by the old and new keys); returns new keyids."""
        old_root = copy.deepcopy(self.root.signed)
        new_root = copy.deepcopy(self.root.signed)
        old_ids = list(new_root.roles[Root.type].keyids)
        count = keys or len(old_ids)
        new_threshold = threshold or min(new_root.roles[Root.type].threshold, count)
        if not 1 <= new_threshold <= count:
            raise RepositoryError(f"threshold {new_threshold} must be between 1 and {count}")
        fresh = [generate() for _ in range(count)]
        for s in fresh:
            self.keys.save(s)
            new_root.add_key(s.public_key, Root.type)
        for keyid in old_ids:
            new_root.revoke_key(keyid, Root.type)
        new_root.roles[Root.type].threshold = new_threshold
        new_root.version += 1
        self._publish_root(new_root, old_root, fresh)
        for keyid in old_ids:
            self.keys.retire(keyid)
        return [s.public_key.keyid for s in fresh]

    def revoke_key(self, role: str, keyid: str | None = None) -> str:
        """Replace one key of ``role`` (default: its only key) by a new one; re-sign what it signs.

        Returns the new keyid. The new root is signed by the old root keys, so a client that
        trusts the old root accepts it."""
        if role not in ROLES:
            raise RepositoryError(f"unknown role {role!r}")
        old_root = copy.deepcopy(self.root.signed)
        new_root = copy.deepcopy(self.root.signed)
        current = list(new_root.roles[role].keyids)
        if keyid is None:
            if len(current) != 1:
                raise RepositoryError(f"{role} has {len(current)} keys: name the one to revoke (--keyid)")
            keyid = current[0]
        matches = [k for k in current if k.startswith(keyid)]
        if len(matches) != 1:
            raise RepositoryError(f"{keyid!r} does not name exactly one key of {role}")
        keyid = matches[0]
        fresh = generate()
        self.keys.save(fresh)
        new_root.add_key(fresh.public_key, role)
        new_root.revoke_key(keyid, role)
        new_root.version += 1
        self._publish_root(new_root, old_root, [fresh] if role == Root.type else [])
        self.keys.retire(keyid)
        self._republish(role)
        return fresh.public_key.keyid

    def add_key(self, role: str, *, threshold: int | None = None) -> str:
        """Give ``role`` one more key (and optionally a new threshold) in a new root version;
        returns the new keyid. Metadata of ``role`` is re-signed with all its keys."""
        if role not in ROLES:
            raise RepositoryError(f"unknown role {role!r}")
        old_root = copy.deepcopy(self.root.signed)
        new_root = copy.deepcopy(self.root.signed)
        fresh = generate()
        self.keys.save(fresh)
        new_root.add_key(fresh.public_key, role)
        count = len(new_root.roles[role].keyids)
        if threshold is not None:
            if not 1 <= threshold <= count:
                raise RepositoryError(f"threshold {threshold} must be between 1 and {count}")
            new_root.roles[role].threshold = threshold
        new_root.version += 1
        self._publish_root(new_root, old_root, [fresh] if role == Root.type else [])
        self._republish(role)
        return fresh.public_key.keyid

    def role_keys(self) -> dict[str, Role]:
        return dict(self.root.signed.roles)

    # --- bundles -----------------------------------------------------------------------------

    def bundle_files(self) -> list[tuple[str, Path]]:
        """(name in bundle, file in repo) for the current consistent snapshot and its blobs."""
        meta = self.path / "metadata"
        files: list[tuple[str, Path]] = []
        for v in range(1, self.root.signed.version + 1):
            files.append((f"metadata/{v}.root.json", meta / f"{v}.root.json"))
        files.append(("metadata/timestamp.json", meta / "timestamp.json"))
        for md in (self.snapshot, self.targets):
            name = f"{md.signed.version}.{md.signed.type}.json"
            files.append((f"metadata/{name}", meta / name))
        for path, target in sorted(self.targets.signed.targets.items()):
            parse_target_path(path)
            source = self._target_file_path(path, target.hashes["sha256"])
            rel = source.relative_to(self.path).as_posix()
            files.append((rel, source))
        return files

    def export_bundle(self, dest: Path) -> Path:
        """Write a bundle: a directory, or a tar file when ``dest`` ends in ``.tar``."""
        files = self.bundle_files()
        missing = [str(src) for _, src in files if not src.is_file()]
        if missing:
            raise RepositoryError(f"repository files are missing: {', '.join(missing[:3])}")
        try:
            if dest.name.endswith(".tar"):
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = temp_name(dest.parent)
                with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                    for name, src in files:
                        info = tar.gettarinfo(str(src), arcname=name)
                        info.uid = info.gid = 0
                        info.uname = info.gname = ""
                        info.mode = 0o644
                        with src.open("rb") as fh:
                            tar.addfile(info, fh)
                tmp.replace(dest)
                return dest
            for name, src in files:
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                # Blobs are named by their hash: one of the right size is the same blob.
                is_blob = not name.startswith("metadata/")
                if is_blob and target.is_file() and target.stat().st_size == src.stat().st_size:
                    continue
                tmp = temp_name(target.parent)
                try:
                    os.link(src, tmp)  # repository files are never modified in place
                except OSError:
                    shutil.copyfile(src, tmp)
                os.replace(tmp, target)
            return dest
        except OSError as exc:
            raise translate_os_error(exc, f"cannot write bundle {dest}") from None


def _meta_for(md: Metadata[Any]) -> MetaFile:
    data = md.to_bytes(_SERIALIZER)
    return MetaFile(
        version=md.signed.version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()}
    )


def _write_metadata(repo: Path, md: Metadata[Any], *, versioned: bool) -> None:
    data = md.to_bytes(_SERIALIZER)
    role = md.signed.type
    meta = repo / "metadata"
    if versioned:
        atomic_write(meta / f"{md.signed.version}.{role}.json", data)
    atomic_write(meta / f"{role}.json", data)


__all__ = ["CONFIG_NAME", "PublishedTarget", "RepoSettings", "Repository", "utcnow"]
