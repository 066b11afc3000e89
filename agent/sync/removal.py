"""What fleet sync removes when the deployments stop naming a model. Pure.

Rules (docs/protocol.md, "Removal"):
- Nothing is removed unless the deployments name at least one model (an empty desired state is
  "no opinion", never "delete everything").
- Kept installed: for each deployed model, the version it deploys (the named one, else the
  newest installed), the version the pool serves, and with ``keep_previous`` the newest installed
  version older than the deployed one (the rollback target). A deployed model whose version is
  not installed keeps every installed version.
- Everything else installed is *unneeded* from the first round it was seen so (``since``), and
  its blobs are deleted once it stayed unneeded for the grace period. It becomes needed again if a
  deployment names it, and its clock restarts from zero the next time.
- Unloaded from the pool at once: models the deployments no longer name, only if the pool got them
  from the store (a model configured locally in ``[model]`` is never touched), never the default
  model, and never the last model the pool serves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.sync.reconcile import desired_models
from registry.metadata import Deployment


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+_-]", version))


def kept_versions(
    deployments: Iterable[Deployment],
    installed: Iterable[tuple[str, str]],
    serving: Mapping[str, str],
    keep_previous: bool,
) -> set[tuple[str, str]] | None:
    """The installed (model, version) pairs to keep; None when the deployments name no model."""
    wanted = desired_models(deployments)
    if not wanted:
        return None
    versions: dict[str, list[str]] = {}
    for model, version in installed:
        versions.setdefault(model, []).append(version)
    keep: set[tuple[str, str]] = set()
    for model, named, _pin, _window in wanted:
        have = sorted(versions.get(model, []), key=_version_key)
        target = (have[-1] if have else None) if named is None else (named if named in have else None)
        if target is None:
            keep.update((model, v) for v in have)
            continue
        keep.add((model, target))
        if model in serving:
            keep.add((model, serving[model]))
        if keep_previous:
            older = [v for v in have if _version_key(v) < _version_key(target)]
            if older:
                keep.add((model, older[-1]))
    return keep


def unneeded_since(
    previous: Mapping[tuple[str, str], float],
    installed: Iterable[tuple[str, str]],
    keep: set[tuple[str, str]],
    now: float,
) -> dict[tuple[str, str], float]:
    """Since when each installed, not kept pair is unneeded (earlier times carried over)."""
    return {key: previous.get(key, now) for key in installed if key not in keep}


def due_for_removal(
    since: Mapping[tuple[str, str], float], now: float, grace_s: float, in_use: Iterable[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """Pairs unneeded for at least ``grace_s`` and not in use by the pool, sorted."""
    busy = set(in_use)
    return sorted(k for k, t in since.items() if now - t >= grace_s and k not in busy)


@dataclass(frozen=True, slots=True)
class PoolModel:
    id: str
    from_store: bool
    """the pool serves it from the registry store (sync or the store catalog), not a local path"""


def to_unload(deployments: Iterable[Deployment], pool: Iterable[PoolModel], default: str | None) -> list[str]:
    """Model ids to unload from the pool (see the module rules), sorted."""
    wanted = {w[0] for w in desired_models(deployments)}
    if not wanted:
        return []
    models = list(pool)
    out = sorted(m.id for m in models if m.from_store and m.id not in wanted and m.id != default)
    if len(out) == len(models) and out:
        out = out[1:]  # the last model serving stays
    return out


__all__ = ["PoolModel", "due_for_removal", "kept_versions", "to_unload", "unneeded_since"]
