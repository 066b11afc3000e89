"""Real signed repositories and enrolled devices for the registry tests.

A :class:`Fleet` is a hub repository made with :mod:`registry.repository` (real Ed25519 keys, real python-tuf
signatures, root 2-of-3) plus helpers to publish small model files and export bundles; a
:class:`Box` is a :class:`DeviceRegistry` enrolled with the fleet's first root that records every
refusal it reports.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from registry.device import DeviceRegistry, ImportResult
from registry.metadata import Deployment, DeploymentEntry, ModelManifest, digest_file
from registry.repository import Repository

CHUNK = 4096


class Box:
    """An enrolled device that keeps the refusals it reported."""

    def __init__(self, state_dir: Path, root: bytes, groups: tuple[str, ...] = ("lab",)) -> None:
        self.refusals: list[tuple[str, str]] = []
        self.state_dir = state_dir
        self.registry = DeviceRegistry(state_dir, on_refusal=lambda r, d: self.refusals.append((r, d)))
        self.registry.enroll(root, "box-1", groups)

    def import_bundle(self, bundle: Path) -> ImportResult:
        return self.registry.import_bundle(bundle)

    def model_ids(self) -> list[str]:
        return [m.id for m in self.registry.models()]


class Fleet:
    def __init__(self, directory: Path, *, root_keys: int = 3, root_threshold: int = 2) -> None:
        self.dir = directory
        self.repo = Repository.init(directory / "repo", root_threshold=root_threshold, root_keys=root_keys)
        self.files = directory / "files"
        self.files.mkdir()
        self._bundles = 0

    @property
    def root_v1(self) -> bytes:
        return (self.repo.path / "metadata" / "1.root.json").read_bytes()

    def box(self, name: str = "box", groups: tuple[str, ...] = ("lab",)) -> Box:
        return Box(self.dir / name, self.root_v1, groups)

    def model(
        self, model_id: str, size: int = 3 * CHUNK + 100, version: str = "1", publish: bool = True
    ) -> ModelManifest:
        """Publish a model file of ``size`` pseudo-random bytes with a real manifest."""
        path = self.files / f"{model_id}-{version}.bin"
        path.write_bytes(os.urandom(size))
        d = digest_file(path, CHUNK)
        manifest = ModelManifest(
            id=model_id,
            version=version,
            family="test",
            parameters=270_000_000,
            quantization="Q4_0",
            format="gguf",
            task="completion",
            file_name="model.gguf",
            file_size=d.size,
            sha256=d.sha256,
            chunk_size=CHUNK,
            chunk_sha256=d.chunk_sha256,
        )
        self.repo.add_file(manifest.target_path, path, d.sha256, manifest.to_custom())
        if publish:
            self.repo.publish()
        return manifest

    def deploy(self, group: str, *models: str) -> None:
        dep = Deployment(group, tuple(DeploymentEntry(m) for m in models))
        self.repo.add_bytes(f"deployments/{group}.json", dep.to_json(), {"kind": "deployment"})
        self.repo.publish()

    def bundle(self, tar: bool = False) -> Path:
        self._bundles += 1
        dest = self.dir / f"bundle-{self._bundles}{'.tar' if tar else ''}"
        return self.repo.export_bundle(dest)

    def expire(self, **days: float) -> None:
        """Make the next signatures of the given roles expire ``days`` from now (negative: past)."""
        self.repo.settings = dataclasses.replace(self.repo.settings, expiry_days=days)


def blob_file(bundle: Path, manifest: ModelManifest) -> Path:
    directory, _, name = manifest.target_path.rpartition("/")
    return bundle / "targets" / directory / f"{manifest.sha256}.{name}"


def meta_file(bundle: Path, role: str) -> Path:
    """The file of ``role`` in a bundle directory (the newest version for versioned roles)."""
    if role == "timestamp":
        return bundle / "metadata" / "timestamp.json"
    files = sorted((bundle / "metadata").glob(f"*.{role}.json"), key=lambda p: int(p.name.split(".")[0]))
    return files[-1]


def rewrite_json(path: Path, edit: Any) -> None:
    """Load, edit in place (``edit(data)``), write back with python-tuf's layout (not re-signed)."""
    data = json.loads(path.read_bytes())
    edit(data)
    path.unlink()  # the bundle file may be a hard link into the repository
    path.write_text(json.dumps(data, indent=1, sort_keys=True))


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()  # never write through a hard link into the repository
    path.write_bytes(data)
