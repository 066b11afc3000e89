"""Does a model fit a box? The box's own selection (:func:`fleet.selection.select`, the memory
estimate of :mod:`fleet.memory`) run on the hardware the box reported in its state.

Per box: ``fits`` (with the estimate and the budget), ``no`` (the reason the box would give:
memory, CPU features, task, disk) or ``unknown`` (the box reported no hardware). The memory the
box gets back by unloading the version of the same model it serves now counts as reclaimable, as
on the box. Disk: the file must fit in the reported free space. ``unknown`` is not refused (the box
checks again and refuses with a named reason: ``model_refused`` / ``load_failed`` events).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fleet.hardware import CgroupInfo, CpuInfo, HardwareProfile, MemoryInfo
from fleet.memory import estimate, fmt_bytes
from fleet.selection import SelectionPolicy, candidate_from_manifest, select
from registry.metadata import ModelManifest


@dataclass(frozen=True, slots=True)
class Fit:
    device: str
    verdict: str
    """``fits``, ``no``, ``unknown``"""
    reason: str


def profile_from_report(hw: Mapping[str, Any]) -> HardwareProfile | None:
    """The profile a box reported (``HardwareProfile.to_dict``); None when it reported none."""
    if not hw or "memory" not in hw:
        return None
    cpu = dict(hw.get("cpu") or {})
    mem = dict(hw.get("memory") or {})
    cg = dict(hw.get("cgroup") or {})
    return HardwareProfile(
        cpu=CpuInfo(
            arch=str(cpu.get("arch", "unknown")),
            model=str(cpu.get("model", "unknown")),
            physical_cores=cpu.get("physical_cores"),
            logical_cores=cpu.get("logical_cores"),
            features=frozenset(cpu.get("features") or ()),
            cpu_quota=cpu.get("cpu_quota"),
        ),
        memory=MemoryInfo(mem.get("total_bytes"), mem.get("available_bytes")),
        cgroup=CgroupInfo(limit_bytes=cg.get("limit_bytes"), usage_bytes=cg.get("usage_bytes")),
        disk_free_bytes=hw.get("disk_free_bytes"),
    )


def doctor_failures(hw: Mapping[str, Any]) -> frozenset[str]:
    """Tensor types that failed ``edge-agent doctor`` with the box's current llama.cpp build, from
    the ``doctor`` table of its hardware report (agent/hardware/report.py); empty when none."""
    table = hw.get("doctor")
    if not isinstance(table, Mapping) or not table.get("current"):
        return frozenset()
    failed = table.get("failed_types")
    return frozenset(str(t) for t in failed) if isinstance(failed, list) else frozenset()


def fit(
    device: str, hardware: Mapping[str, Any], manifest: ModelManifest, serving: ModelManifest | None = None
) -> Fit:
    """Whether ``manifest`` fits the box; ``serving`` is the version of the model it serves now."""
    profile = profile_from_report(hardware)
    if profile is None:
        return Fit(device, "unknown", "the box reported no hardware")
    reclaim = 0
    if serving is not None:
        reclaim = estimate(candidate_from_manifest(serving).shape, SelectionPolicy().runtime).total
    policy = SelectionPolicy(reclaimable_bytes=reclaim, failed_types=doctor_failures(hardware))
    row = select(profile, [candidate_from_manifest(manifest)], policy).rows[0]
    if row.verdict not in ("fits", "chosen"):
        return Fit(device, "no", row.reason)
    disk = profile.disk_free_bytes
    if disk is not None and manifest.file_size > disk:
        return Fit(device, "no", f"file is {fmt_bytes(manifest.file_size)}, {fmt_bytes(disk)} free on disk")
    need = row.memory.total if row.memory is not None else 0
    return Fit(device, "fits", f"needs {fmt_bytes(need)}")


def manifest_of(repo: Any, model: str, version: str) -> ModelManifest | None:
    for t in repo.published():
        if t.custom.get("kind") == "model" and t.path.startswith(f"models/{model}/{version}/"):
            return ModelManifest.from_custom(t.custom)
    return None


def check_boxes(repo: Any, store: Any, boxes: Iterable[str], model: str, version: str | None) -> list[Fit]:
    """The fit of ``model`` (``version``, else the newest published) on each of ``boxes``."""
    from registry.device import _version_key

    if version is None:
        versions = {t.path.split("/")[2] for t in repo.published() if t.path.startswith(f"models/{model}/")}
        version = max(versions, key=_version_key) if versions else None
    manifest = manifest_of(repo, model, version) if version else None
    wanted = set(boxes)
    out = []
    for row in store.devices():
        if row.device not in wanted:
            continue
        if manifest is None:
            out.append(Fit(row.device, "unknown", f"no manifest for {model} {version}"))
            continue
        state = row.state
        served = (state.serving or {}).get(model) if state is not None else None
        serving = manifest_of(repo, model, served) if served and served != version else None
        out.append(fit(row.device, state.hardware if state is not None else {}, manifest, serving))
    return out


def refuse_unfit(
    repo: Any, store: Any, boxes: Iterable[str], model: str, version: str | None, *, force: bool
) -> bool:
    """Print the fit per box; True (refuse) when a box cannot take the model and not ``force``."""
    fits = check_boxes(repo, store, boxes, model, version)
    for f in fits:
        print(f"fit {model} {version or '(newest)'} on {f.device}: {f.verdict}: {f.reason}")
    bad = [f for f in fits if f.verdict == "no"]
    if bad and not force:
        names = "; ".join(f"{f.device}: {f.reason}" for f in bad)
        print(f"edge-hub: {model} does not fit {names} (--force to push anyway)", file=sys.stderr)
        return True
    return False


def check_push(args: Any, repo: Any, group: str, model: str, version: str | None) -> bool:
    """Before ``deployment set`` / ``deploy``: the fit on the group's boxes in the hub database
    (``--db``, ``$EDGE_HUB_DB``, ``./hub.db``; none there: nothing to check, said so). True = refuse."""
    from hub.sync.db import db_target, exists
    from hub.sync.store import HubStore

    db = db_target(getattr(args, "db", None) or None)
    if not exists(db):
        print(f"fit: no hub database at {db}: the boxes of {group} are not checked", file=sys.stderr)
        return False
    store = HubStore(db)
    try:
        return refuse_unfit(repo, store, group_boxes(store, group), model, version, force=args.force)
    finally:
        store.close()


def group_boxes(store: Any, group: str) -> list[str]:
    return sorted(r.device for r in store.devices() if r.state is not None and group in r.state.groups)


__all__ = [
    "Fit",
    "check_boxes",
    "check_push",
    "doctor_failures",
    "fit",
    "group_boxes",
    "manifest_of",
    "profile_from_report",
    "refuse_unfit",
]
