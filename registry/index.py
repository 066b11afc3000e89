"""What is installed on this device: the index of verified targets (``installed.json``).

An entry is added only after its blob passed verification and was renamed into the store; the
index is rewritten atomically once per import, so it never names a blob that was not verified.
Entries survive newer metadata that no longer lists them: a model already installed stays usable
offline until it is removed on purpose (``edge-agent registry remove`` or a deployment change).

Invariants: :class:`Index` is an immutable value; ``Index.from_json(i.to_json()) == i``; entries
are re-parsed (paths, manifests) when loaded, so a hand-edited file with an unsafe path or a
malformed manifest is refused rather than served.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.exceptions import ManifestError, Reason, StoreError
from registry.files import atomic_write, read_bounded
from registry.metadata import CompanionFile, Deployment, ModelManifest, TargetRef, parse_target_path

INDEX_MAX_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class InstalledTarget:
    """A verified, installed target."""

    path: str
    sha256: str
    length: int
    custom: Mapping[str, Any]
    installed_at: str
    targets_version: int
    ref: TargetRef = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ref", parse_target_path(self.path))

    @property
    def kind(self) -> str:
        return self.ref.kind

    def manifest(self) -> ModelManifest | None:
        if self.custom.get("kind") == "model":
            return ModelManifest.from_custom(self.custom)
        return None

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "length": self.length,
            "custom": dict(self.custom),
            "installed_at": self.installed_at,
            "targets_version": self.targets_version,
        }


@dataclass(frozen=True, slots=True)
class InstalledModel:
    """A model version: its primary file and its companion files (tokenizer ...)."""

    manifest: ModelManifest
    target: InstalledTarget
    companions: tuple[InstalledTarget, ...] = ()

    @property
    def id(self) -> str:
        return self.manifest.id

    def companion(self, name: str) -> InstalledTarget | None:
        for c in self.companions:
            if c.ref.file_name == name:
                return c
        return None


@dataclass(frozen=True, slots=True)
class Index:
    targets: Mapping[str, InstalledTarget] = field(default_factory=dict)

    def with_targets(self, added: Iterable[InstalledTarget]) -> Index:
        merged = dict(self.targets)
        for t in added:
            merged[t.path] = t
        return Index(merged)

    def without(self, paths: Iterable[str]) -> Index:
        drop = set(paths)
        return Index({p: t for p, t in self.targets.items() if p not in drop})

    def models(self) -> list[InstalledModel]:
        """Installed model versions whose companions are all installed, sorted by id then version."""
        out = []
        for t in self.targets.values():
            manifest = t.manifest()
            if manifest is None:
                continue
            companions = []
            for name in manifest.companions:
                c = self.targets.get(f"models/{manifest.id}/{manifest.version}/{name}")
                if c is not None:
                    companions.append(c)
            if len(companions) == len(manifest.companions):
                out.append(InstalledModel(manifest, t, tuple(companions)))
        return sorted(out, key=lambda m: (m.manifest.id, m.manifest.version))

    def model_paths(self, model_id: str) -> list[str]:
        """Every target path belonging to ``model_id`` (all versions, companions included)."""
        return [p for p, t in self.targets.items() if t.ref.kind == "model" and t.ref.name == model_id]

    def of_kind(self, kind: str) -> list[InstalledTarget]:
        return [t for t in self.targets.values() if t.ref.kind == kind]

    def digests(self) -> set[str]:
        return {t.sha256 for t in self.targets.values()}

    def to_json(self) -> bytes:
        return json.dumps(
            {"version": 1, "targets": [t.to_json_dict() for _, t in sorted(self.targets.items())]},
            indent=1,
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Index:
        try:
            data = json.loads(raw)
            items = data["targets"]
            targets = [InstalledTarget(**item) for item in items]
            for t in targets:
                if t.custom.get("kind") == "model":
                    t.manifest()
                elif t.custom.get("kind") == "model_file":
                    CompanionFile.from_custom(t.custom)
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"the installed index is corrupt: {exc}", reason=Reason.MALFORMED) from None
        except ManifestError as exc:
            raise StoreError(
                f"the installed index is corrupt: {exc.detail}", reason=Reason.MALFORMED
            ) from None
        return cls({t.path: t for t in targets})


def load_index(path: Path) -> Index:
    if not path.exists():
        return Index()
    return Index.from_json(read_bounded(path, INDEX_MAX_BYTES))


def save_index(path: Path, index: Index) -> None:
    atomic_write(path, index.to_json(), 0o644)


def deployment_of(target: InstalledTarget, raw: bytes) -> Deployment:
    """Parse an installed deployment document (its bytes come from the verified store)."""
    dep = Deployment.from_json(raw)
    if dep.group != target.ref.name:
        raise ManifestError(f"{target.path} describes group {dep.group!r}")
    return dep


__all__ = [
    "INDEX_MAX_BYTES",
    "Index",
    "InstalledModel",
    "InstalledTarget",
    "deployment_of",
    "load_index",
    "save_index",
]
