"""The device side of the registry: enrollment, verified import, the installed set.

Layout under ``<state_dir>/registry`` (mode 0700)::

    enrollment.json      device id, groups, sha256 of the trust anchor
    anchor.root.json     the root.json given at enrollment (the Updater's ``bootstrap``)
    metadata/            python-tuf's trusted metadata cache (root_history/, timestamp.json ...)
    blobs/sha256/<hex>   verified blobs (see :mod:`registry.store`)
    installed.json       the index of installed targets (see :mod:`registry.index`)
    .lock                one writer at a time (CLI and daemon)

One path for every source: :meth:`DeviceRegistry.update` takes any
:class:`~registry.fetch.RegistryFetcher` (a bundle now, MQTT later). It refreshes the metadata
with python-tuf's ``Updater`` (trust anchor, root rotation, threshold, rollback, freeze,
mix-and-match and endless-data checks all happen there), installs the wanted blobs through the
verifying store, then rewrites the index once. Any refusal is reported through
``on_refusal(reason, detail)`` (default: a structlog warning; the agent wires its audit log in)
and raised as a :class:`~registry.exceptions.RegistryError`; the index is then unchanged, so the
models verified before are still served.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from registry.exceptions import (
    ManifestError,
    NotEnrolled,
    Reason,
    Refused,
    RegistryError,
    StoreError,
)
from registry.fetch import METADATA_BASE, TARGETS_BASE, BundleFetcher, RegistryFetcher
from registry.files import atomic_write, read_bounded, translate_os_error
from registry.index import Index, InstalledModel, InstalledTarget, deployment_of, load_index, save_index
from registry.metadata import DOCUMENT_MAX_BYTES, METADATA_MAX_BYTES, Deployment, policy_target_path
from registry.store import BlobStore
from registry.trust import TargetEntry, entries_from_targets, refusal_for, verify_trust_anchor

RefusalCallback = Callable[[str, str], None]
_GROUP = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_DEVICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RESERVED_DEVICE_IDS = frozenset({"hub", "operator", "ca", "broker"})
"""Names a device may not take: broker identities (the ACL's and the plugin's privileged users) and
the certificate files of the fleet CA and the broker (``ca.crt``, ``broker.key`` ...)."""

_log = structlog.get_logger("registry")


def log_refusal(reason: str, detail: str) -> None:
    """Default refusal sink: a structured warning (the audit log replaces it in the agent)."""
    _log.warning("registry_refused", reason=reason, detail=detail)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Enrollment:
    device_id: str
    groups: tuple[str, ...]
    root_sha256: str
    enrolled_at: str

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "device_id": self.device_id,
                "groups": list(self.groups),
                "root_sha256": self.root_sha256,
                "enrolled_at": self.enrolled_at,
            },
            indent=2,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Enrollment:
        try:
            data = json.loads(raw)
            return cls(data["device_id"], tuple(data["groups"]), data["root_sha256"], data["enrolled_at"])
        except (ValueError, KeyError, TypeError) as exc:
            raise NotEnrolled(f"enrollment.json is corrupt: {exc}") from None


@dataclass(frozen=True, slots=True)
class ImportResult:
    targets_version: int
    installed: tuple[str, ...] = ()
    """Target paths written to the store by this import."""
    already: tuple[str, ...] = ()
    """Wanted target paths whose blob was already installed."""
    skipped: tuple[str, ...] = ()
    """Targets in the source that this device does not want (other groups' deployments, models
    not named by this device's deployments)."""


@dataclass(frozen=True, slots=True)
class VerifyResult:
    ok: tuple[str, ...] = ()
    bad: tuple[tuple[str, str], ...] = ()
    """(target path, reason detail) of blobs that failed and were removed."""


@dataclass
class _TrackingFetcher(FetcherInterface):
    """Wraps the real fetcher to remember which metadata file was loaded last (to name the role
    in a refusal) and its bytes (to explain a signature failure)."""

    inner: FetcherInterface
    last_url: str | None = None
    last_bytes: bytearray = field(default_factory=bytearray)

    def _fetch(self, url: str) -> Iterator[bytes]:
        self.last_url = url
        self.last_bytes = bytearray()
        blocks = self.inner.fetch(url)
        if not url.startswith(METADATA_BASE):
            return blocks
        return self._remember(blocks)

    def _remember(self, blocks: Iterator[bytes]) -> Iterator[bytes]:
        for block in blocks:
            if len(self.last_bytes) <= max(METADATA_MAX_BYTES.values()):
                self.last_bytes += block
            yield block


class DeviceRegistry:
    """The registry of one device, rooted at ``<state_dir>/registry``."""

    def __init__(
        self,
        state_dir: Path,
        on_refusal: RefusalCallback = log_refusal,
        now: Callable[[], datetime] = _now,
    ) -> None:
        self.dir = state_dir / "registry"
        self.metadata_dir = self.dir / "metadata"
        self.store = BlobStore(self.dir / "blobs")
        self.index_path = self.dir / "installed.json"
        self.on_refusal = on_refusal
        self.now = now
        self.updating_deployments: list[Deployment] | None = None
        """This device's deployments of the targets version the last :meth:`update` reached, set
        as soon as their documents are verified and installed, before any model is fetched (a
        fetcher reads their ``mirrors``); None before that in this process or when the update
        stopped earlier."""

    # --- enrollment --------------------------------------------------------------------------

    def enroll(
        self, root_bytes: bytes, device_id: str, groups: tuple[str, ...], *, force: bool = False
    ) -> Enrollment:
        """Make ``root_bytes`` this device's trust anchor. Re-enrolling with another root requires
        ``force`` and clears the trusted metadata (installed blobs stay, the index is cleared)."""
        if not _DEVICE.fullmatch(device_id):
            raise ManifestError(f"bad device id {device_id!r} (letters, digits, . _ -)")
        if device_id.lower() in RESERVED_DEVICE_IDS:
            raise ManifestError(f"bad device id {device_id!r}: reserved for the broker's own identities")
        if not groups or not all(_GROUP.fullmatch(g) for g in groups):
            raise ManifestError(f"bad groups {groups!r} (lowercase letters, digits, . _ -; at least one)")
        try:
            verify_trust_anchor(root_bytes, self.now())
        except Refused as exc:
            self._refuse(exc)
            raise
        digest = hashlib.sha256(root_bytes).hexdigest()
        with self._locked():
            current = self._read_enrollment()
            if current is not None and current.root_sha256 != digest:
                if not force:
                    raise ManifestError(
                        "this device is enrolled with another root; use --force to replace it "
                        "(the installed models are forgotten)"
                    )
                self._reset_trust()
            enrollment = Enrollment(device_id, tuple(dict.fromkeys(groups)), digest, self.now().isoformat())
            atomic_write(self.dir / "anchor.root.json", root_bytes, 0o644)
            atomic_write(self.dir / "enrollment.json", enrollment.to_json(), 0o644)
        return enrollment

    def _reset_trust(self) -> None:
        shutil.rmtree(self.metadata_dir, ignore_errors=True)
        save_index(self.index_path, Index())

    def _read_enrollment(self) -> Enrollment | None:
        path = self.dir / "enrollment.json"
        if not path.exists():
            return None
        return Enrollment.from_json(read_bounded(path, 1 << 16))

    def enrollment(self) -> Enrollment:
        e = self._read_enrollment()
        if e is None:
            raise NotEnrolled("this device is not enrolled: run `edge-agent enroll --root root.json ...`")
        return e

    @property
    def enrolled(self) -> bool:
        return (self.dir / "enrollment.json").exists()

    # --- import ------------------------------------------------------------------------------

    def import_bundle(self, bundle: Path) -> ImportResult:
        try:
            fetcher = BundleFetcher(bundle)
        except RegistryError as exc:
            self._refuse(exc)
            raise
        with fetcher:
            return self.update(fetcher)

    def update(
        self, fetcher: RegistryFetcher | FetcherInterface, *, only_deployed: bool = False
    ) -> ImportResult:
        """Refresh trusted metadata from ``fetcher`` and install what this device wants.

        Wanted: this device's deployments (its groups), the policies they name, and the models the deployments
        name. With no deployment naming a model, a bundle import (``only_deployed=False``: the
        operator chose the bundle) installs every model in it, while a fleet sync
        (``only_deployed=True``) installs no model at all: a box downloads nothing until something
        is deployed to it (docs/protocol.md).

        A refused update changes nothing: python-tuf persists each metadata file as it verifies
        it, so checks that come after (a signed target with a bad path, a bad sha256, an oversized
        manifest, a missing blob) would otherwise leave the new timestamp, snapshot and targets
        trusted, and the hub's next good bundle of the same versions would be refused as a
        rollback. Those three files are restored as they were before the update (a verified root
        rotation is kept: it is checked by the previous root's threshold on its own)."""
        try:
            with self._locked():
                saved = self._trusted_files()
                try:
                    return self._update(fetcher, only_deployed)
                except RegistryError:
                    self._restore_trusted_files(saved)
                    raise
        except RegistryError as exc:
            self._refuse(exc)
            raise

    _RESTORED = ("timestamp.json", "snapshot.json", "targets.json")

    def _trusted_files(self) -> dict[str, bytes | None]:
        out: dict[str, bytes | None] = {}
        for name in self._RESTORED:
            path = self.metadata_dir / name
            out[name] = read_bounded(path, METADATA_MAX_BYTES["targets"]) if path.is_file() else None
        return out

    def _restore_trusted_files(self, saved: dict[str, bytes | None]) -> None:
        for name, data in saved.items():
            path = self.metadata_dir / name
            try:
                current = path.read_bytes() if path.is_file() else None
                if current == data:
                    continue
                if data is None:
                    path.unlink(missing_ok=True)
                else:
                    atomic_write(path, data)
            except OSError as exc:  # the refusal stands either way; the next update retries
                _log.warning("trusted_metadata_restore_failed", file=name, error=str(exc))

    def _update(self, fetcher: FetcherInterface, only_deployed: bool) -> ImportResult:
        enrollment = self.enrollment()
        anchor = read_bounded(self.dir / "anchor.root.json", METADATA_MAX_BYTES["root"])
        for tmp in self.store.stale_temps():
            tmp.unlink(missing_ok=True)
        tracking = _TrackingFetcher(fetcher)
        self.updating_deployments = None
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        config = UpdaterConfig(
            root_max_length=METADATA_MAX_BYTES["root"],
            timestamp_max_length=METADATA_MAX_BYTES["timestamp"],
            snapshot_max_length=METADATA_MAX_BYTES["snapshot"],
            targets_max_length=METADATA_MAX_BYTES["targets"],
            max_delegations=1,
        )
        try:
            updater = Updater(
                str(self.metadata_dir),
                METADATA_BASE,
                None,
                TARGETS_BASE,
                fetcher=tracking,
                config=config,
                bootstrap=anchor,
            )
            updater.refresh()
        except OSError as exc:
            raise translate_os_error(exc, "cannot write trusted metadata") from None
        except (tuf_exc.RepositoryError, tuf_exc.DownloadError, ValueError) as exc:
            raise refusal_for(
                exc,
                tracking.last_url,
                rejected=bytes(tracking.last_bytes),
                trusted_root=self._trusted_root(),
            ) from None
        targets = self._verified_targets(updater)
        entries = entries_from_targets(targets.targets)
        version = targets.version
        by_path = {e.path: e for e in entries}

        # Documents first: this device's deployments, then the policies they name (never a policy
        # no deployment of this device names: a lab policy does not reach the shop's boxes).
        wanted_docs = [e for e in entries if e.ref.kind == "deployment" and e.ref.name in enrollment.groups]
        fresh: list[InstalledTarget] = []
        installed: list[str] = []
        already: list[str] = []
        deployments: list[Deployment] = []

        def take(e: TargetEntry) -> None:
            target, fetched = self._install(tracking, e, version)
            fresh.append(target)
            (installed if fetched else already).append(e.path)

        for e in wanted_docs:
            if e.length > DOCUMENT_MAX_BYTES:
                raise Refused(
                    f"{e.path} is {e.length} bytes, documents are capped at {DOCUMENT_MAX_BYTES}",
                    reason=Reason.METADATA_TOO_LARGE,
                )
            take(e)
            if e.ref.kind == "deployment":
                raw = read_bounded(self.store.path(e.sha256), DOCUMENT_MAX_BYTES)
                try:
                    # resolved for this device: a wave naming it, else the group's entry
                    deployments.append(deployment_of(fresh[-1], raw).for_device(enrollment.device_id))
                except ManifestError as exc:
                    raise Refused(f"{e.path}: {exc.detail}", reason=Reason.MALFORMED) from None
        self.updating_deployments = list(deployments)
        for name in sorted({d.policy for d in deployments if d.policy is not None}):
            policy = by_path.get(policy_target_path(name))
            if policy is None:
                raise Refused(
                    f"a deployment names policy {name!r}, which is not signed", reason=Reason.MISSING
                )
            if policy.length > DOCUMENT_MAX_BYTES:
                raise Refused(
                    f"{policy.path} is {policy.length} bytes, documents are capped at {DOCUMENT_MAX_BYTES}",
                    reason=Reason.METADATA_TOO_LARGE,
                )
            take(policy)
            wanted_docs.append(policy)

        for e in self._wanted_models(entries, deployments, only_deployed):
            assert e.manifest is not None
            for path in (
                e.path,
                *(f"models/{e.ref.name}/{e.ref.version}/{c}" for c in e.manifest.companions),
            ):
                part = by_path.get(path)
                if part is None:
                    raise Refused(
                        f"{e.path} names companion {path} which is not signed", reason=Reason.MISSING
                    )
                take(part)

        index = load_index(self.index_path)
        # Policies and deployments follow the signed set: one the hub removed disappears here too.
        wanted = {e.path for e in wanted_docs}
        stale_docs = [
            t.path for t in [*index.of_kind("deployment"), *index.of_kind("policy")] if t.path not in wanted
        ]
        save_index(self.index_path, index.without(stale_docs).with_targets(fresh))
        taken = {t.path for t in fresh}
        skipped = tuple(p for p in sorted(by_path) if p not in taken)
        log = _log.info if installed else _log.debug  # a sync that finds nothing new stays quiet
        log("registry_imported", targets_version=version, installed=len(installed), already=len(already))
        return ImportResult(version, tuple(installed), tuple(already), skipped)

    def _trusted_root(self) -> Root | None:
        try:
            raw = read_bounded(self.metadata_dir / "root.json", METADATA_MAX_BYTES["root"])
            md = Metadata[Root].from_bytes(raw)
        except Exception:
            return None
        return md.signed if isinstance(md.signed, Root) else None

    def _verified_targets(self, updater: Updater) -> Targets:
        """The top-level targets that ngclient just verified, read back through the Updater: the
        persisted copy only supplies the list of paths; each TargetFile comes from
        ``get_targetinfo`` (the verified in-memory set)."""
        raw = read_bounded(self.metadata_dir / "targets.json", METADATA_MAX_BYTES["targets"])
        listed: Metadata[Targets] = Metadata[Targets].from_bytes(raw)
        verified: dict[str, TargetFile] = {}
        for path in listed.signed.targets:
            info = updater.get_targetinfo(path)
            if info is None:
                raise Refused(f"{path} is not in the verified targets", reason=Reason.UNKNOWN_TARGET)
            verified[path] = info
        return Targets(version=listed.signed.version, expires=listed.signed.expires, targets=verified)

    @staticmethod
    def _wanted_models(
        entries: list[TargetEntry], deployments: list[Deployment], only_deployed: bool
    ) -> list[TargetEntry]:
        models = [e for e in entries if e.manifest is not None]
        if not deployments or not any(d.models for d in deployments):
            return [] if only_deployed else models
        out: dict[str, TargetEntry] = {}
        for d in deployments:
            for want in d.models:
                candidates = [e for e in models if e.ref.name == want.model]
                if want.version is not None:
                    candidates = [e for e in candidates if e.ref.version == want.version]
                if not candidates:
                    raise Refused(
                        f"deployment {d.group} wants {want.model} {want.version or '(newest)'}, "
                        "which is not signed",
                        reason=Reason.MISSING,
                    )
                best = max(candidates, key=lambda e: _version_key(e.ref.version or ""))
                out[best.path] = best
        return list(out.values())

    def _install(
        self, fetcher: FetcherInterface, e: TargetEntry, version: int
    ) -> tuple[InstalledTarget, bool]:
        """The index entry of ``e``, and whether its blob had to be fetched (it was not in the store)."""
        fetched = not self.store.has(e.sha256, e.length)
        if fetched:
            directory, _, name = e.path.rpartition("/")
            url = f"{TARGETS_BASE}{directory}/{e.sha256}.{name}"
            self.store.install(
                _translated(fetcher, url, e.path), name=e.path, length=e.length, sha256=e.sha256
            )
        target = InstalledTarget(e.path, e.sha256, e.length, dict(e.custom), self.now().isoformat(), version)
        return target, fetched

    # --- the installed set -------------------------------------------------------------------

    def index(self) -> Index:
        return load_index(self.index_path)

    def models(self) -> list[InstalledModel]:
        return self.index().models()

    def deployments(self) -> list[Deployment]:
        out = []
        enrollment = self._read_enrollment()
        groups = enrollment.groups if enrollment else ()
        device = enrollment.device_id if enrollment else ""
        for t in self.index().of_kind("deployment"):
            if t.ref.name in groups:
                with contextlib.suppress(RegistryError):
                    raw = read_bounded(self.store.path(t.sha256), DOCUMENT_MAX_BYTES)
                    out.append(deployment_of(t, raw).for_device(device))
        return out

    def policy_bytes(self, name: str) -> bytes | None:
        """A verified policy document's bytes (re-hashed now), or None if not installed."""
        t = self.index().targets.get(f"policies/{name}.json")
        if t is None:
            return None
        self.verified_path(t)
        return read_bounded(self.store.path(t.sha256), DOCUMENT_MAX_BYTES)

    def verified_path(self, target: InstalledTarget) -> Path:
        """Re-hash ``target``'s blob and return its path; refuse (and report) if it changed."""
        try:
            return self.store.verify(target.sha256, target.length, target.path)
        except RegistryError as exc:
            self._refuse(exc)
            raise

    def verify(self) -> VerifyResult:
        """Re-hash every installed blob; drop the ones that fail (a later import restores them)."""
        ok: list[str] = []
        bad: list[tuple[str, str]] = []
        with self._locked():
            index = load_index(self.index_path)
            for path, t in sorted(index.targets.items()):
                try:
                    self.store.verify(t.sha256, t.length, path)
                    ok.append(path)
                except Refused as exc:
                    self._refuse(exc)
                    bad.append((path, str(exc)))
            if bad:
                for path, _ in bad:
                    self.store.remove(index.targets[path].sha256)
                save_index(self.index_path, index.without(p for p, _ in bad))
        return VerifyResult(tuple(ok), tuple(bad))

    def remove(self, model_id: str, version: str | None = None) -> list[str]:
        """Forget ``model_id`` (only ``version`` of it, if given; else every version) and delete its
        blobs (unless shared)."""
        with self._locked():
            index = load_index(self.index_path)
            paths = [
                p
                for p in index.model_paths(model_id)
                if version is None or index.targets[p].ref.version == version
            ]
            if not paths:
                what = f"model {model_id!r}" + (f" version {version!r}" if version is not None else "")
                raise StoreError(f"{what} is not installed", reason=Reason.NOT_INSTALLED)
            remaining = index.without(paths)
            save_index(self.index_path, remaining)
            for p in paths:
                digest = index.targets[p].sha256
                if digest not in remaining.digests():
                    self.store.remove(digest)
        return sorted(paths)

    def gc(self) -> list[str]:
        """Delete blobs no installed target references, and temp files of dead processes."""
        with self._locked():
            return self.store.gc(load_index(self.index_path).digests())

    # --- helpers -----------------------------------------------------------------------------

    def _refuse(self, exc: RegistryError) -> None:
        try:
            self.on_refusal(exc.reason.value, exc.detail)
        except Exception as cb_exc:
            _log.error("refusal_callback_failed", error=str(cb_exc))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise translate_os_error(exc, f"cannot open {self.dir}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _translated(fetcher: FetcherInterface, url: str, path: str) -> Iterator[bytes]:
    """Blocks of a target file; a missing file or a read failure becomes a named refusal."""
    try:
        yield from fetcher.fetch(url)
    except tuf_exc.DownloadHTTPError:
        raise Refused(f"the source is missing the blob of {path}", reason=Reason.MISSING) from None
    except tuf_exc.DownloadError as exc:
        raise Refused(
            f"cannot read the blob of {path}: {exc.__cause__ or exc}", reason=Reason.BUNDLE_UNREADABLE
        ) from None
    except (OSError, EOFError, ValueError) as exc:
        raise Refused(f"cannot read the blob of {path}: {exc}", reason=Reason.BUNDLE_UNREADABLE) from None


def _version_key(version: str) -> tuple[Any, ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+_-]", version))


__all__ = [
    "DeviceRegistry",
    "Enrollment",
    "ImportResult",
    "RefusalCallback",
    "VerifyResult",
    "log_refusal",
]
