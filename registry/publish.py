"""Publishing operations on an open repository: models (with companions and variants), policies,
deployments. Each function stages targets and then signs a new targets/snapshot/timestamp set
with one :meth:`Repository.publish`, so a reader never sees half of an operation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from registry.exceptions import ManifestError
from registry.files import translate_os_error
from registry.metadata import (
    DOCUMENT_MAX_BYTES,
    CompanionFile,
    Deployment,
    DeploymentEntry,
    ModelManifest,
    Task,
    WaveEntry,
    canonical_json,
    deployment_target_path,
    digest_file,
    load_json_object,
    model_target_path,
    policy_target_path,
)
from registry.model_info import build_manifest, model_format
from registry.policy import validate_policy
from registry.quantize import Variant, parse_targets, quantize_gguf, quantize_onnx_int8
from registry.repository import Repository


@dataclass(frozen=True, slots=True)
class Companion:
    path: Path
    purpose: str = "tokenizer"
    name: str | None = None


def add_model(
    repo: Repository,
    source: Path,
    *,
    model_id: str,
    version: str = "1",
    task: Task | None = None,
    chat_template: str | None = None,
    licence: str | None = None,
    family: str | None = None,
    min_cpu_features: tuple[str, ...] = (),
    companions: Sequence[Companion] = (),
    publish: bool = True,
) -> ModelManifest:
    """Add ``source`` (+ companion files) as model ``model_id``/``version`` and publish."""
    chunk = repo.settings.chunk_size
    names = tuple(c.name or c.path.name for c in companions)
    manifest = build_manifest(
        source,
        model_id=model_id,
        version=version,
        task=task,
        chat_template=chat_template,
        licence=licence,
        family=family,
        min_cpu_features=min_cpu_features,
        companions=names,
        chunk_size=chunk,
    )
    repo.add_file(manifest.target_path, source, manifest.sha256, manifest.to_custom())
    for c, name in zip(companions, names, strict=True):
        d = digest_file(c.path, chunk)
        file = CompanionFile(
            model_id, version, name, c.purpose, d.size, d.sha256, d.chunk_size, d.chunk_sha256
        )
        repo.add_file(file.target_path, c.path, d.sha256, file.to_custom())
    if publish:
        repo.publish()
    return manifest


def quantize_and_add(
    repo: Repository,
    source: Path,
    targets: str,
    *,
    model_id: str,
    out_dir: Path,
    allow_requantize: bool = False,
    threads: int = 2,
    version: str = "1",
    chat_template: str | None = None,
    licence: str | None = None,
) -> list[tuple[Variant, ModelManifest]]:
    """Quantize ``source`` to each of ``targets`` (``"q4_0,q8_0"``) and add every variant as model
    ``<model_id>-<target>``; one publish at the end."""
    fmt = model_format(source)
    names = parse_targets(targets, fmt)
    out: list[tuple[Variant, ModelManifest]] = []
    for name in names:
        if fmt == "gguf":
            variant = quantize_gguf(
                source,
                out_dir / f"{model_id}-{name}.gguf",
                name,
                allow_requantize=allow_requantize,
                threads=threads,
            )
        else:
            variant = quantize_onnx_int8(
                source, out_dir / f"{model_id}-{name}.onnx", allow_requantize=allow_requantize
            )
        manifest = add_model(
            repo,
            variant.path,
            model_id=f"{model_id}-{name}",
            version=version,
            chat_template=chat_template,
            licence=licence,
            publish=False,
        )
        out.append((variant, manifest))
    repo.publish()
    return out


def add_policy(repo: Repository, source: Path, name: str | None = None, groups: tuple[str, ...] = ()) -> str:
    """Publish a policy document as ``policies/<name>.json``, only after it validates
    (:func:`registry.policy.validate_policy`): nothing is signed for a document devices would refuse.

    ``groups``: the groups whose devices apply it; each one's deployment names it (``policy``), in
    the same signed targets version. A device installs only the policies its deployments name."""
    name = name or source.stem
    try:
        with source.open("rb") as fh:
            raw = fh.read(DOCUMENT_MAX_BYTES + 1)  # one byte more than allowed shows a larger file
    except OSError as exc:
        raise translate_os_error(exc, f"cannot read policy {source}") from None
    data = load_json_object(raw, f"policy {source}")
    validate_policy(data, str(source))
    path = policy_target_path(name)
    repo.add_bytes(path, canonical_json(data), {"kind": "policy"})
    for group in groups:
        dep = dataclasses.replace(current_deployment(repo, group), policy=name)
        repo.add_bytes(deployment_target_path(group), dep.to_json(), {"kind": "deployment"})
    repo.publish()
    return path


def current_deployment(repo: Repository, group: str) -> Deployment:
    raw = repo.read_target(deployment_target_path(group), DOCUMENT_MAX_BYTES)
    return Deployment.from_json(raw) if raw is not None else Deployment(group)


def set_deployment(
    repo: Repository,
    group: str,
    model_id: str,
    *,
    version: str | None = None,
    pin: bool = False,
    maintenance_window: str | None = None,
    mirrors: tuple[str, ...] | None = None,
) -> Deployment:
    """Make ``group`` hold ``model_id`` (must be published); ``pin`` makes it the default;
    ``maintenance_window`` and ``mirrors`` replace the group's when given, else stay."""
    published = {t.path for t in repo.published()}
    if not any(p.startswith(f"models/{model_id}/") for p in published):
        raise ManifestError(f"model {model_id!r} is not published (edge-hub model add first)")
    if version is not None and not any(
        p.startswith(model_target_path(model_id, version, "")) for p in published
    ):
        raise ManifestError(f"model {model_id!r} has no version {version!r}")
    dep = current_deployment(repo, group).with_model(DeploymentEntry(model_id, version, pin))
    if maintenance_window is not None:
        dep = dataclasses.replace(dep, maintenance_window=maintenance_window)
    if mirrors is not None:
        dep = dataclasses.replace(dep, mirrors=tuple(mirrors))
    repo.add_bytes(deployment_target_path(group), dep.to_json(), {"kind": "deployment"})
    repo.publish()
    return dep


def set_rollout(
    repo: Repository, group: str, model_id: str, base_version: str, wave: WaveEntry | None
) -> Deployment:
    """Sign ``group``'s deployment with ``model_id`` at ``base_version`` for every box and, with
    ``wave``, the wave's boxes at the wave's version (staged rollouts, hub/rollout/). The entry's
    pin and the other models, window, policy and mirrors are kept."""
    dep = current_deployment(repo, group)
    entry = next((m for m in dep.models if m.model == model_id), None)
    pin = entry.pin if entry is not None else False
    dep = dep.with_model(DeploymentEntry(model_id, base_version, pin))
    others = tuple(w for w in dep.waves if w.model != model_id)
    dep = dep.with_waves((*others, wave) if wave is not None else others)
    repo.add_bytes(deployment_target_path(group), dep.to_json(), {"kind": "deployment"})
    repo.publish()
    return dep


__all__ = [
    "Companion",
    "add_model",
    "add_policy",
    "current_deployment",
    "quantize_and_add",
    "set_deployment",
    "set_rollout",
]
