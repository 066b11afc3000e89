"""Which model files this daemon may serve, and their :class:`ModelInfo`.

Either one explicitly configured file (``[model] path``: development and tests), or the models
installed in the signed store under ``<state_dir>/registry`` (``edge-agent demo`` builds one;
``edge-agent registry import`` fills it).

Models served from the verified store: only files whose hash was re-checked just now.
For every installed model (the newest installed version of each id) the primary file and its
companions are re-hashed against the signed digests before a :class:`ModelInfo` is handed out; a
file that changed on disk is refused (reported through the registry's refusal callback) and left
out, and the other models are still served. The model pinned by this device's deployment comes
first (the pool's default).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.config import Settings
from agent.engine.base import ModelInfo
from fleet.log import get_logger
from registry.device import DeviceRegistry, RefusalCallback
from registry.exceptions import RegistryError
from registry.index import InstalledModel

log = get_logger(__name__)


def log_refusal(reason: str, detail: str) -> None:
    """The agent's refusal sink until the audit log takes registry events: a structured warning."""
    log.warning("registry_refused", reason=reason, detail=detail)


@dataclass(frozen=True, slots=True)
class StoreModel:
    """A verified, servable model: what the engine gets, and where its companion files are."""

    info: ModelInfo
    companions: dict[str, Path]
    pinned: bool


def _version_key(version: str) -> tuple[Any, ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+_-]", version))


def newest_per_id(models: list[InstalledModel]) -> list[InstalledModel]:
    best: dict[str, InstalledModel] = {}
    for m in models:
        cur = best.get(m.id)
        if cur is None or _version_key(m.manifest.version) > _version_key(cur.manifest.version):
            best[m.id] = m
    return [best[k] for k in sorted(best)]


def _created(iso: str) -> int:
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return 0


def verified_models(registry: DeviceRegistry) -> list[StoreModel]:
    """Re-hash and describe every servable model; the pinned one first."""
    if not registry.enrolled:
        return []
    pins = {e.model for d in registry.deployments() for e in d.models if e.pin}
    out: list[StoreModel] = []
    for m in newest_per_id(registry.models()):
        try:
            path = registry.verified_path(m.target)
            companions = {c.ref.file_name or c.path: registry.verified_path(c) for c in m.companions}
        except RegistryError as exc:
            log.error("model_refused_at_load", model=m.id, reason=exc.reason.value, detail=exc.detail)
            continue
        man = m.manifest
        info = ModelInfo(
            id=man.id,
            path=path,
            format=man.format,
            task=man.task,
            n_ctx_train=man.context_length,
            size_bytes=man.file_size,
            created=_created(m.target.installed_at),
            chat_template=man.chat_template,
        )
        out.append(StoreModel(info, companions, man.id in pins))
    out.sort(key=lambda s: not s.pinned)
    return out


def companion_path(
    settings: Settings, info: ModelInfo, name: str, *, registry: DeviceRegistry | None = None
) -> Path | None:
    """The verified companion file ``name`` (e.g. ``tokenizer.json``) of a store-served model, re-hashed
    now; None when ``info`` is not served from the store or has no such companion."""
    registry = (
        registry if registry is not None else DeviceRegistry(settings.state_dir, on_refusal=log_refusal)
    )
    if info.path.parent != registry.store.dir:
        return None
    for m in registry.models():
        if m.manifest.sha256 == info.path.name:
            companion = m.companion(name)
            if companion is None:
                return None
            try:
                return registry.verified_path(companion)
            except RegistryError:
                return None
    return None


def discover_store(
    settings: Settings, on_refusal: RefusalCallback = log_refusal, registry: DeviceRegistry | None = None
) -> list[ModelInfo]:
    """The verified models of ``<state_dir>/registry``, pinned first."""
    registry = registry if registry is not None else DeviceRegistry(settings.state_dir, on_refusal=on_refusal)
    return [s.info for s in verified_models(registry)]


def info_for_file(path: Path, model_id: str | None = None, chat_template: str | None = None) -> ModelInfo:
    st = path.stat()
    onnx = path.suffix == ".onnx"
    return ModelInfo(
        id=model_id or path.name.removesuffix(".gguf").removesuffix(".onnx"),
        path=path,
        format="onnx" if onnx else "gguf",
        task="embedding" if onnx else "completion",
        size_bytes=st.st_size,
        created=int(st.st_mtime),
        chat_template=chat_template,
    )


def discover(settings: Settings, registry: DeviceRegistry | None = None) -> list[ModelInfo]:
    """Models to serve, the default first. Missing or refused files are skipped, never fatal."""
    if settings.model.path is not None:
        path = settings.model.path
        if not path.is_file():
            return []
        return [info_for_file(path, settings.model.id, settings.model.chat_template)]
    return discover_store(settings, registry=registry)


__all__ = [
    "StoreModel",
    "discover",
    "info_for_file",
    "companion_path",
    "discover_store",
    "log_refusal",
    "newest_per_id",
    "verified_models",
]
