"""The selection's I/O edge, used by the daemon at start and by the re-probe (and by ``edge-agent
select``): candidates read from the installed models' GGUF headers, speeds measured by ``edge-agent
bench``, the tensor types ``edge-agent doctor`` failed, the pin (config, or the hub's deployment),
the memory estimate for the engine's settings, and :func:`prefer_selected` (the best fit first).

The choice itself is pure (:mod:`fleet.selection`); everything here reads files or probes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent.config import Settings
from agent.engine.base import ModelInfo
from agent.errors import AgentError
from agent.hardware.probe import probe
from fleet.hardware import HardwareProfile
from fleet.log import get_logger
from fleet.memory import MIB, ModelShape, RuntimeParams, estimate, repack_types
from fleet.selection import (
    Candidate,
    Selection,
    SelectionPolicy,
    candidate_from_gguf,
    select,
)
from registry.exceptions import RegistryError, StoreError
from registry.files import atomic_write
from registry.gguf_info import read_gguf_info

log = get_logger(__name__)

SPEEDS_FILE = "selection/speeds.json"
MAX_SPEEDS_BYTES = 1 << 20
BENCH_PROMPT = (
    "An edge box in a wind turbine reports its temperature, vibration and power output every "
    "second. Summarise what an operator should check first when the readings drift. "
)


# --- speeds store ---------------------------------------------------------------------------------


def speeds_path(settings: Settings) -> Path:
    return settings.state_dir / SPEEDS_FILE


def load_speeds(path: Path) -> dict[str, Any]:
    """The stored measurements; an absent or unreadable file is an empty store (never fatal)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_SPEEDS_BYTES + 1)
        data = json.loads(raw) if len(raw) <= MAX_SPEEDS_BYTES else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def save_speeds(path: Path, data: Mapping[str, Any]) -> None:
    """Atomic and durable (:func:`registry.files.atomic_write`); a failed write is an AgentError."""
    try:
        atomic_write(path, json.dumps(data, indent=2, sort_keys=True).encode())
    except StoreError as exc:
        raise AgentError(f"cannot store the measured speeds: {exc.detail}") from None


def measured_speeds(data: Mapping[str, Any], infos: list[ModelInfo]) -> dict[str, float]:
    """Generation tokens/s by model id, for models whose file size still matches the measurement."""
    models = data.get("models")
    if not isinstance(models, dict):
        return {}
    out: dict[str, float] = {}
    for info in infos:
        entry = models.get(info.id)
        if isinstance(entry, dict) and entry.get("file_size") == info.size_bytes:
            tps = entry.get("gen_tps")
            if isinstance(tps, int | float) and tps > 0:
                out[info.id] = float(tps)
    return out


# --- candidates -----------------------------------------------------------------------------------


def onnx_initializers(path: Path) -> tuple[int, int]:
    """(bytes, elements) of the graph's initializers (shape x element size; external data unread)."""
    import math

    import numpy as np
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    total = elements = 0
    for t in model.graph.initializer:
        n = math.prod(t.dims)
        elements += n
        total += n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total, elements


_CANDIDATES: dict[tuple[str, str, str, str, int, int], Candidate] = {}
_MAX_CANDIDATES = 256


def candidate_for(info: ModelInfo) -> Candidate:
    """A candidate from an installed model: its GGUF header, or its initializers for ONNX.

    Remembered by file identity (path, size, mtime): reading a GGUF header walks its whole
    vocabulary (262k tokens for Gemma 3), and the re-probe asks again every interval for files
    that do not change. A changed file is read again.
    """
    try:
        st = info.path.stat()
    except OSError:
        return _read_candidate(info)  # raises the reader's own error for the missing file
    key = (info.id, info.task, info.format, str(info.path), st.st_size, st.st_mtime_ns)
    found = _CANDIDATES.get(key)
    if found is None:
        found = _read_candidate(info)
        if len(_CANDIDATES) >= _MAX_CANDIDATES:
            _CANDIDATES.clear()
        _CANDIDATES[key] = found
    return found


def _read_candidate(info: ModelInfo) -> Candidate:
    if info.format == "gguf":
        return candidate_from_gguf(read_gguf_info(info.path), info.id, task=info.task)
    size = info.size_bytes or info.path.stat().st_size
    try:
        weights, params = onnx_initializers(info.path)
    except Exception as exc:  # a malformed graph: fall back to the file size (and say so)
        log.warning("onnx_initializers_unreadable", model=info.id, error=f"{type(exc).__name__}: {exc}")
        weights, params = size, 0
    shape = ModelShape.onnx(size, weights)
    bpw = weights * 8 / params if params else 0.0
    return Candidate(info.id, "onnx", params, "onnx", bpw, "onnx", info.task, shape)


def installed_candidates(infos: list[ModelInfo]) -> tuple[list[Candidate], list[str]]:
    """Candidates for the installed models, and a note for each model whose file is unreadable."""
    out: list[Candidate] = []
    notes: list[str] = []
    for info in infos:
        try:
            out.append(candidate_for(info))
        except (RegistryError, OSError) as exc:
            notes.append(f"{info.id}: skipped: {exc}")
    return out, notes


def policy_from_settings(settings: Settings, profile: HardwareProfile, task: str | None) -> SelectionPolicy:
    backends = {"gguf"}
    if "CPUExecutionProvider" in profile.onnx_providers:
        backends.add("onnx")
    sel = settings.selection
    return SelectionPolicy(
        task=task,
        runtime=RuntimeParams(
            n_ctx=settings.engine.n_ctx,
            n_batch=settings.engine.n_batch,
            n_ubatch=settings.engine.n_batch,
            n_seq=settings.engine.n_parallel,
            kv_unified=settings.engine.kv_unified,
            kv_type_k=settings.engine.kv_cache_type_k,
            kv_type_v=settings.engine.kv_cache_type_v,
            repack=not settings.engine.batch_invariant,
            repack_types=repack_types(profile.cpu.arch, profile.cpu.features),
            onnx_batch=settings.embedding.batch_size,
            onnx_max_length=settings.embedding.max_length,
        ),
        headroom_bytes=sel.headroom_mb * MIB,
        speed_floor_tps=sel.speed_floor_tps,
        pin=sel.pin,
        backends=frozenset(backends),
    )


def doctor_failed_types(settings: Settings) -> frozenset[str]:
    """Tensor types that failed ``edge-agent doctor`` with the llama.cpp build installed now.

    Results of another build (or none) give the empty set; never raises.
    """
    from agent.engine.doctor import failed_types_for

    return failed_types_for(settings.state_dir)


def run_selection(
    settings: Settings,
    task: str | None,
    profile: HardwareProfile | None = None,
    *,
    infos: list[ModelInfo] | None = None,
    reclaimable_bytes: int = 0,
    pin: str | None = None,
    below: tuple[int, float] | None = None,
) -> tuple[HardwareProfile, Selection, list[str]]:
    """Probe (unless given), read the models' headers (``infos``, default: the installed ones), select.

    The daemon's re-probe passes the pool's models (no re-hash of the store), the memory the
    current model would give back, and the effective pin (config or hub).
    """
    data = load_speeds(speeds_path(settings))
    if profile is None:
        bandwidth = data.get("bandwidth_gbps")
        profile = probe(
            store_dir=settings.models_dir,
            bandwidth_gbps=float(bandwidth) if isinstance(bandwidth, int | float) else None,
        )
    if infos is None:
        from agent.daemon.catalog import discover

        infos = discover(settings)
    candidates, notes = installed_candidates(infos)
    policy = policy_from_settings(settings, profile, task)
    policy = replace(
        policy,
        reclaimable_bytes=reclaimable_bytes,
        pin=pin or policy.pin,
        below=below,
        failed_types=doctor_failed_types(settings),
    )
    return profile, select(profile, candidates, policy, measured_speeds(data, infos)), notes


def model_memory_estimate(settings: Settings) -> Callable[[ModelInfo], int]:
    """The pool's ``estimate`` hook: :mod:`fleet.memory` from the GGUF header, file size on failure."""
    params = policy_from_settings(settings, HardwareProfile(), None).runtime
    cache: dict[tuple[str, int], int] = {}

    def estimate_bytes(info: ModelInfo) -> int:
        key = (str(info.path), info.size_bytes)
        if key not in cache:
            try:
                shape = candidate_for(info).shape
                cache[key] = estimate(shape, params).total
            except (RegistryError, OSError):
                cache[key] = info.size_bytes
        return cache[key]

    return estimate_bytes


def hub_pin(settings: Settings) -> str | None:
    """The model this device's deployments pin (the hub's pin), or None; never raises."""
    try:
        from registry.device import DeviceRegistry

        registry = DeviceRegistry(settings.state_dir)
        if not registry.enrolled:
            return None
        pins = sorted({e.model for d in registry.deployments() for e in d.models if e.pin})
    except (RegistryError, OSError, ValueError) as exc:
        log.warning("hub_pin_unreadable", error=str(exc))
        return None
    return pins[0] if pins else None


def effective_pin(settings: Settings) -> str | None:
    """A pin in the config wins over the hub's (the operator at the box has the last word)."""
    return settings.selection.pin or hub_pin(settings)


def prefer_selected(settings: Settings, infos: list[ModelInfo]) -> list[ModelInfo]:
    """``infos`` with the model to serve by default first: the pin, else the selection's choice.

    Used at startup so that the pool loads the best fit first. Never raises: any failure keeps the
    catalog's order (and is logged).
    """
    generative = [i for i in infos if i.task != "embedding"]
    if len(generative) < 2 and not settings.selection.pin:
        return infos
    try:
        _, result, notes = run_selection(settings, "completion", infos=infos, pin=effective_pin(settings))
    except (AgentError, RegistryError, OSError) as exc:
        log.warning("startup_selection_failed", error=str(exc))
        return infos
    for note in notes:
        log.warning("selection_note", note=note)
    log.info("model_selected", choice=result.choice.id if result.choice else None, reason=result.message)
    if result.choice is None:
        return infos
    first = [i for i in infos if i.id == result.choice.id]
    return first + [i for i in infos if i.id != result.choice.id]


__all__ = [
    "SPEEDS_FILE",
    "candidate_for",
    "doctor_failed_types",
    "effective_pin",
    "hub_pin",
    "installed_candidates",
    "load_speeds",
    "measured_speeds",
    "model_memory_estimate",
    "onnx_initializers",
    "policy_from_settings",
    "prefer_selected",
    "run_selection",
    "save_speeds",
    "speeds_path",
]
