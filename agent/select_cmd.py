"""``edge-agent probe``, ``edge-agent select`` and ``edge-agent bench``: the I/O edge of selection.

* ``probe [--json] [--bandwidth]`` prints the hardware profile of this box.
* ``select [--task T] [--explain] [--json] [--ctx N]`` reads the installed models' GGUF headers,
  probes the box, loads the speeds measured by ``bench`` and the tensor types that failed
  ``edge-agent doctor`` (``<state_dir>/doctor.json``, only when it was measured on the llama.cpp
  build installed now) and prints the choice (with ``--explain``: every candidate, its estimated
  memory, its speed, the verdict and the reason). Exit status 1 when nothing fits.
* ``bench [--model ID] [--tokens N]`` measures prompt and generation tokens/s of installed GGUF
  models with llama.cpp (and the memory copy bandwidth of the box) and stores them in
  ``<state_dir>/selection/speeds.json`` (written atomically), where ``select`` and the daemon's
  re-probe find them. A stored speed is used only while the model file keeps the same size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from agent.config import Settings
from agent.engine.base import ModelInfo
from agent.errors import AgentError, ConfigError
from agent.hardware.probe import measure_bandwidth, probe
from agent.hardware.types import HardwareProfile
from agent.log import get_logger
from agent.memory import MIB, ModelShape, RuntimeParams, estimate, fmt_bytes, repack_types
from agent.selection import (
    Candidate,
    Selection,
    SelectionPolicy,
    SwitchDecision,
    SwitchHistory,
    SwitchPolicy,
    candidate_from_gguf,
    observe,
    select,
    should_switch,
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
        from agent.catalog import discover

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
    """The pool's ``estimate`` hook: :mod:`agent.memory` from the GGUF header, file size on failure."""
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


# --- run time -------------------------------------------------------------------------------------


class SwapTarget(Protocol):
    """What the re-probe needs from the model pool (:class:`agent.engine.pool.ModelPool`)."""

    @property
    def default_id(self) -> str | None: ...

    def models(self) -> list[ModelInfo]: ...

    def memory_of(self, model_id: str) -> int: ...

    async def swap(self, info: ModelInfo, *, pin: bool = False) -> Any: ...


class Reselector:
    """The scheduled re-probe: probe, select, decide with hysteresis, hot-swap through the pool.

    ``tick()`` is one re-probe (the scheduler may call it); ``run()`` calls it every
    ``[selection] reprobe_interval_s`` with up to 10% jitter until cancelled. A tick never raises:
    failures are logged and the current model keeps serving. The pool's swap keeps in-flight
    requests on the previous model until they finish.
    """

    def __init__(
        self,
        settings: Settings,
        pool: SwapTarget,
        *,
        probe_fn: Callable[[], HardwareProfile] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self._probe = probe_fn
        self._clock = clock
        self.history = SwitchHistory()
        self.last: SwitchDecision | None = None

    def _switch_policy(self, pin: str | None) -> SwitchPolicy:
        sel = self.settings.selection
        return SwitchPolicy(
            down_after=sel.down_after,
            up_after=sel.up_after,
            min_interval_s=sel.min_switch_interval_s,
            pin=pin,
        )

    async def tick(self) -> SwitchDecision | None:
        try:
            return await self._tick()
        except Exception as exc:  # the re-probe must never take the daemon down
            log.error("reprobe_failed", error=f"{type(exc).__name__}: {exc}")
            return None

    async def _tick(self) -> SwitchDecision:
        s = self.settings
        profile = await asyncio.to_thread(self._probe or (lambda: probe(store_dir=s.models_dir)))
        now = self._clock()
        self.history = self.history.observe(observe(profile, now, s.selection.headroom_mb * MIB))
        current = self.pool.default_id
        reclaim = self.pool.memory_of(current) if current else 0
        infos = [i for i in self.pool.models() if i.task != "embedding"]
        pin = await asyncio.to_thread(effective_pin, s)
        below = None
        recent = self.history.observations[-s.selection.down_after :]
        if current and len(recent) >= s.selection.down_after and all(o.throttled for o in recent):
            serving = next((i for i in infos if i.id == current), None)
            if serving is not None and serving.format == "gguf":
                below = (await asyncio.to_thread(candidate_for, serving)).quality
        _, result, _ = await asyncio.to_thread(
            partial(run_selection, infos=infos, reclaimable_bytes=reclaim, pin=pin, below=below),
            s,
            "completion",
            profile,
        )
        decision = should_switch(current, result, self.history, self._switch_policy(pin))
        self.last = decision
        log.info(
            "reprobe",
            current=current,
            target=decision.target,
            switch=decision.switch,
            reason=decision.reason,
            usable_bytes=profile.usable_memory_bytes,
            throttled=profile.throttled,
        )
        if decision.switch and decision.target and s.selection.auto_switch:
            info = next((i for i in infos if i.id == decision.target), None)
            if info is None:
                return decision
            try:
                await self.pool.swap(info)
            except AgentError as exc:
                log.error("reprobe_swap_failed", target=info.id, error=str(exc))
                return SwitchDecision(False, current, f"swap to {info.id} failed: {exc}")
            self.history = replace(self.history, last_switch_at=self._clock())
        return decision

    async def run(self) -> None:
        interval = self.settings.selection.reprobe_interval_s
        while True:
            await asyncio.sleep(interval * (1.0 + random.uniform(0.0, 0.1)))  # noqa: S311 (jitter)
            await self.tick()


# --- output ---------------------------------------------------------------------------------------


def selection_to_dict(result: Selection) -> dict[str, Any]:
    return {
        "choice": result.choice.id if result.choice else None,
        "message": result.message,
        "budget_bytes": result.budget_bytes,
        "candidates": [
            {
                "id": r.candidate.id,
                "verdict": r.verdict,
                "reason": r.reason,
                "parameters": r.candidate.parameters,
                "quantization": r.candidate.quantization,
                "bits_per_weight": round(r.candidate.bits_per_weight, 3),
                "memory": r.memory.as_dict() if r.memory else None,
                "speed_tps": round(r.speed_tps, 2) if r.speed_tps is not None else None,
                "speed_source": r.speed_source,
            }
            for r in result.rows
        ],
    }


def _console() -> Any:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=160)


def print_explain(result: Selection) -> None:
    from rich.table import Table

    table = Table("model", "params", "quant", "memory", "speed", "verdict", "reason")
    for r in result.rows:
        speed = "-" if r.speed_tps is None else f"{r.speed_tps:.1f} tok/s ({r.speed_source})"
        style = {"chosen": "bold green", "fits": "", "rejected": "dim"}[r.verdict]
        table.add_row(
            r.candidate.id,
            f"{r.candidate.parameters / 1e6:,.0f}M" if r.candidate.parameters else "-",
            f"{r.candidate.quantization} ({r.candidate.bits_per_weight:.2f} bpw)"
            if r.candidate.bits_per_weight
            else r.candidate.quantization,
            fmt_bytes(r.memory.total) if r.memory else "-",
            speed,
            r.verdict,
            r.reason,
            style=style,
        )
    console = _console()
    budget = fmt_bytes(result.budget_bytes) if result.budget_bytes is not None else "unknown"
    console.print(f"memory budget: {budget}")
    console.print(table)


def print_profile(p: HardwareProfile) -> None:
    from rich.table import Table

    def size(n: int | None) -> str:
        return fmt_bytes(n) if n is not None else "unknown"

    t = Table("", "", show_header=False)
    t.add_row("device", p.device_model)
    c = p.cpu
    t.add_row(
        "cpu",
        f"{c.model} ({c.arch}), {c.physical_cores or '?'} cores / {c.logical_cores or '?'} threads"
        + (f", quota {c.cpu_quota:g} CPUs" if c.cpu_quota else ""),
    )
    t.add_row("simd", " ".join(sorted(c.features)) or "unknown")
    t.add_row("memory", f"{size(p.memory.available_bytes)} available of {size(p.memory.total_bytes)}")
    t.add_row("swap", f"{size(p.memory.swap_free_bytes)} free of {size(p.memory.swap_total_bytes)}")
    limit = size(p.cgroup.limit_bytes) if p.cgroup.limit_bytes is not None else "no limit"
    t.add_row(
        "cgroup", f"{p.cgroup.version} {p.cgroup.path}: {limit}, working set {size(p.cgroup.usage_bytes)}"
    )
    t.add_row("usable", size(p.usable_memory_bytes))
    t.add_row("disk free", size(p.disk_free_bytes))
    t.add_row("gpus", ", ".join(f"{g.name} ({size(g.memory_total_bytes)})" for g in p.gpus) or "none found")
    t.add_row("accelerators", ", ".join(f"{a.path} ({a.driver})" for a in p.accelerators) or "none found")
    t.add_row("onnx providers", ", ".join(p.onnx_providers) or "unknown")
    temps = ", ".join(f"{z.name} {z.temp_c:.0f}°C" for z in p.thermal if z.temp_c is not None)
    t.add_row(
        "thermal", (temps or "unknown") + ("" if p.throttled is None else f"; throttled: {p.throttled}")
    )
    t.add_row(
        "power", p.power.source + (f" {p.power.battery_percent:.0f}%" if p.power.battery_percent else "")
    )
    if p.memory_bandwidth_gbps:
        t.add_row("bandwidth", f"{p.memory_bandwidth_gbps:.1f} GB/s (copy)")
    for note in p.notes:
        t.add_row("note", note)
    _console().print(t)


# --- commands -------------------------------------------------------------------------------------


def cmd_probe(args: argparse.Namespace) -> int:
    from agent.cli import settings_from_args

    settings = settings_from_args(args)
    bandwidth = measure_bandwidth() if args.bandwidth else None
    if bandwidth is None:
        stored = load_speeds(speeds_path(settings)).get("bandwidth_gbps")
        bandwidth = float(stored) if isinstance(stored, int | float) else None
    profile = probe(store_dir=settings.models_dir, bandwidth_gbps=bandwidth)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
    else:
        print_profile(profile)
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from agent.cli import settings_from_args

    settings = settings_from_args(args)
    if args.ctx is not None:
        settings = settings.model_copy(
            update={"engine": settings.engine.model_copy(update={"n_ctx": args.ctx})}
        )
    _, result, notes = run_selection(settings, args.task)
    if args.json:
        data = selection_to_dict(result)
        data["notes"] = notes
        print(json.dumps(data, indent=2))
    else:
        if args.explain:
            print_explain(result)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        print(result.message)
    return 0 if result.choice is not None else 1


def bench_model(info: ModelInfo, settings: Settings, n_gen: int) -> dict[str, Any]:
    """Load ``info`` with the engine the daemon builds and time a prompt and ``n_gen`` greedy tokens.

    Prompt tokens/s = prompt tokens / time to the first chunk; generation tokens/s = the tokens
    after the first / the time after the first chunk.
    """
    return asyncio.run(_bench_engine(info, settings, n_gen))


async def _bench_engine(info: ModelInfo, settings: Settings, n_gen: int) -> dict[str, Any]:
    from agent.app import build_engine
    from agent.engine.base import CompletionRequest, SamplingParams

    engine = build_engine(info, settings)
    await engine.load()
    try:
        request = CompletionRequest(
            prompt=BENCH_PROMPT * 4,
            max_tokens=n_gen,
            sampling=SamplingParams(temperature=0.0, top_k=1, seed=0),
            request_id="bench",
        )
        started = time.perf_counter()
        first: float | None = None
        usage = None
        async for chunk in engine.generate(request):
            if first is None and chunk.text:
                first = time.perf_counter()
            if chunk.usage is not None:
                usage = chunk.usage
        ended = time.perf_counter()
    finally:
        await engine.close()
    if usage is None or first is None or usage.completion_tokens < 2:
        raise AgentError(f"{info.id}: the benchmark generated too few tokens to measure")
    return {
        "prompt_tps": round(usage.prompt_tokens / (first - started), 2),
        "gen_tps": round((usage.completion_tokens - 1) / max(ended - first, 1e-9), 2),
        "prompt_tokens": usage.prompt_tokens,
        "gen_tokens": usage.completion_tokens,
        "n_threads": settings.engine.n_threads,
        "file_size": info.size_bytes,
        "measured_at": int(time.time()),
    }


def cmd_bench(args: argparse.Namespace) -> int:
    from agent.app import default_threads
    from agent.catalog import discover
    from agent.cli import settings_from_args

    settings = settings_from_args(args)
    infos = [i for i in discover(settings) if i.format == "gguf"]
    if args.model:
        infos = [i for i in infos if i.id == args.model]
        if not infos:
            raise ConfigError(f"bench: model {args.model!r} is not installed")
    if not infos:
        print("no installed GGUF model to benchmark", file=sys.stderr)
        return 1
    path = speeds_path(settings)
    data = load_speeds(path)
    models = data.get("models")
    if not isinstance(models, dict):
        models = {}
    threads = settings.engine.n_threads or default_threads()
    settings = settings.model_copy(
        update={"engine": settings.engine.model_copy(update={"n_threads": threads, "n_ctx": 2048})}
    )
    data["bandwidth_gbps"] = round(measure_bandwidth(), 2)
    print(f"memory copy bandwidth: {data['bandwidth_gbps']} GB/s")
    for info in infos:
        result = bench_model(info, settings, args.tokens)
        models[info.id] = result
        print(f"{info.id}: prompt {result['prompt_tps']} tok/s, generation {result['gen_tps']} tok/s")
    data["models"] = models
    save_speeds(path, data)
    print(f"stored in {path}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("probe", help="show what this box is: CPU, memory, cgroup, accelerators, thermal")
    p.add_argument("--json", action="store_true")
    p.add_argument("--bandwidth", action="store_true", help="also measure the memory copy bandwidth")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("select", help="pick the best installed model that fits this box")
    p.add_argument(
        "--task",
        choices=["completion", "chat", "embedding"],
        default="completion",
        help="what the model must do (default: completion, which chat models also serve)",
    )
    p.add_argument("--explain", action="store_true", help="list every candidate with its verdict")
    p.add_argument("--json", action="store_true")
    p.add_argument("--ctx", type=int, default=None, help="context size to plan for (default: [engine] n_ctx)")
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("bench", help="measure tokens/s of installed models for selection")
    p.add_argument("--model", default=None, help="only this model id")
    p.add_argument("--tokens", type=int, default=32, help="tokens to generate per model")
    p.set_defaults(func=cmd_bench)


__all__ = [
    "SPEEDS_FILE",
    "Reselector",
    "SwapTarget",
    "effective_pin",
    "hub_pin",
    "model_memory_estimate",
    "prefer_selected",
    "bench_model",
    "candidate_for",
    "doctor_failed_types",
    "installed_candidates",
    "load_speeds",
    "measured_speeds",
    "onnx_initializers",
    "policy_from_settings",
    "register",
    "run_selection",
    "save_speeds",
    "selection_to_dict",
    "speeds_path",
]
