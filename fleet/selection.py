"""Pure model selection: (hardware profile, candidates, policy, measured speeds) -> choice + reasons.

The steps, each leaving a reason on every candidate it rejects:

1. filters: task, backend/format available on this box, required CPU features, tensor types that
   failed ``edge-agent doctor`` with this build on this box (``failed_types``), the access policy
   (a predicate passed in);
2. memory: the estimate (:mod:`fleet.memory`) for the configured context must fit the budget =
   usable memory (available memory, capped by the cgroup limit minus its working set)
   - headroom - memory reserved for models still loading + memory reclaimable from the model that
   would be replaced;
3. speed floor: generation tokens/s measured by ``edge-agent bench`` on this box when present, else
   estimated as ``efficiency x memory bandwidth / bytes read per token`` (decode is memory bound:
   each token reads every weight once);
4. among the rest, the best quality: most parameters, then highest precision (bits per weight),
   then the smaller estimate, then the id -- a total order, so the choice is deterministic.

A pin overrides the ranking and the speed floor, never the filters or the memory budget. Under
sustained thermal throttling the re-probe sets ``below`` to the serving model's quality, so that
the choice steps down (memory pressure needs no such help: the budget itself shrinks).

Invariants (property-tested): the choice's estimate never exceeds the budget; more memory never
yields a lower-quality choice; the result does not depend on the order of the candidates.
:func:`should_switch` adds hysteresis on top for run-time re-selection.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from fleet.hardware import HardwareProfile
from fleet.memory import (
    MIB,
    MemoryEstimate,
    ModelShape,
    RuntimeParams,
    estimate,
    fmt_bytes,
    shape_from_gguf,
)
from registry.gguf_info import SWA_PATTERN_BY_ARCH, GGUFInfo
from registry.metadata import ModelManifest

SPEED_EFFICIENCY = 0.55
"""Share of the copy bandwidth that llama.cpp's decode achieves (calibrated by bench/selection_bench.py)."""
DEFAULT_BANDWIDTH_GBPS: Mapping[str, float] = {
    "Cortex-A53": 2.0,
    "Cortex-A72": 4.0,
    "Cortex-A76": 10.0,
    "Cortex-A78AE": 20.0,
    "aarch64": 4.0,
    "armv7l": 2.0,
    "x86_64": 15.0,
}
"""Conservative copy bandwidth by CPU model, then by architecture, when none was measured."""
UNKNOWN_BANDWIDTH_GBPS = 2.0

Verdict = Literal["chosen", "fits", "rejected"]
SpeedSource = Literal["measured", "estimated", "n/a"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A model the box could serve: plain data, from a manifest or a GGUF header."""

    id: str
    family: str
    parameters: int
    quantization: str
    bits_per_weight: float
    format: str
    task: str
    shape: ModelShape
    context_length: int | None = None
    min_cpu_features: frozenset[str] = frozenset()
    version: str = ""
    tensor_types: frozenset[str] = frozenset()
    """The ggml types of the file's tensors (``Q4_K``, ``Q6_K``, ``F32``), from its GGUF header;
    empty when no header is at hand (a manifest), see :func:`tensor_types_of`."""

    @property
    def quality(self) -> tuple[int, float]:
        return (self.parameters, round(self.bits_per_weight, 3))


@dataclass(frozen=True, slots=True)
class SelectionPolicy:
    task: str | None = None
    runtime: RuntimeParams = field(default_factory=RuntimeParams)
    headroom_bytes: int = 256 * MIB
    speed_floor_tps: float = 0.0
    pin: str | None = None
    reserved_bytes: int = 0
    """Memory promised to models that are loading but not yet resident."""
    reclaimable_bytes: int = 0
    """Memory that unloading the current model would give back (re-selection at run time)."""
    backends: frozenset[str] = frozenset({"gguf", "onnx"})
    failed_types: frozenset[str] = frozenset()
    """Tensor types that failed ``edge-agent doctor`` with the llama.cpp build installed here: a
    candidate holding any of them is rejected (a pin does not override it)."""
    allowed: Callable[[Candidate], bool] | None = None
    """The access policy: False refuses the candidate."""
    below: tuple[int, float] | None = None
    """Only candidates of lower quality than this (parameters, bits per weight): set by the
    re-probe under sustained thermal throttling, to step down from the serving model."""


@dataclass(frozen=True, slots=True)
class Assessment:
    """One row of ``--explain``."""

    candidate: Candidate
    verdict: Verdict
    reason: str
    memory: MemoryEstimate | None = None
    speed_tps: float | None = None
    speed_source: SpeedSource = "n/a"


@dataclass(frozen=True, slots=True)
class Selection:
    choice: Candidate | None
    budget_bytes: int | None
    rows: tuple[Assessment, ...]
    message: str

    def row(self, model_id: str) -> Assessment | None:
        return next((r for r in self.rows if r.candidate.id == model_id), None)


# --- adapters -------------------------------------------------------------------------------------


def candidate_from_gguf(
    info: GGUFInfo, model_id: str, *, task: str = "completion", min_cpu_features: Iterable[str] = ()
) -> Candidate:
    return Candidate(
        id=model_id,
        family=info.architecture,
        parameters=info.parameter_count,
        quantization=info.quantization,
        bits_per_weight=info.bits_per_weight,
        format="gguf",
        task=task,
        shape=shape_from_gguf(info),
        context_length=info.context_length or None,
        min_cpu_features=frozenset(min_cpu_features),
        tensor_types=frozenset(info.bytes_by_type),
    )


def candidate_from_manifest(m: ModelManifest) -> Candidate:
    """A candidate from a signed manifest (no header at hand: head size = embedding / heads)."""
    n_layers = m.n_layers or 0
    n_head = m.n_heads or 1
    head_dim = (m.embedding_length or 0) // n_head
    pattern = SWA_PATTERN_BY_ARCH.get(m.family)
    swa = tuple(pattern is None or il % pattern < pattern - 1 for il in range(n_layers))
    shape = ModelShape(
        file_size=m.file_size,
        n_layers=n_layers,
        n_embd=m.embedding_length or 0,
        n_head=n_head,
        n_head_kv=(m.n_kv_heads or n_head,),
        key_length=head_dim,
        value_length=head_dim,
        n_vocab=m.vocab_size or 0,
        sliding_window=m.sliding_window,
        swa_layers=swa if m.sliding_window else (),
        format=m.format,
        initializer_bytes=m.file_size if m.format == "onnx" else 0,
    )
    return Candidate(
        id=m.id,
        family=m.family,
        parameters=m.parameters,
        quantization=m.quantization,
        bits_per_weight=m.file_size * 8 / m.parameters,
        format=m.format,
        task=m.task,
        shape=shape,
        context_length=m.context_length,
        min_cpu_features=frozenset(m.min_cpu_features),
        version=m.version,
    )


# --- the pure core --------------------------------------------------------------------------------

_K_QUANT_FILE = re.compile(r"^(Q[2-6]_K)(_[SML])?$")


def tensor_types_of(c: Candidate) -> frozenset[str]:
    """The tensor types ``c`` is made of: from its header when known, else from its quantization
    name (a K-quant mix ``Q4_K_M`` counts as its main type ``Q4_K``; others, ``Q4_0``, ``F16``,
    ``IQ4_NL``, are a tensor type of the same name)."""
    if c.tensor_types:
        return c.tensor_types
    name = c.quantization.upper().removeprefix("MOSTLY_")
    match = _K_QUANT_FILE.match(name)
    return frozenset({match.group(1) if match else name})


def failed_tensor_types(c: Candidate, failed: frozenset[str]) -> tuple[str, ...]:
    """The tensor types of ``c`` that are in ``failed`` (sorted); empty for ONNX models."""
    if not failed or c.format != "gguf":
        return ()
    return tuple(sorted(tensor_types_of(c) & failed))


def memory_budget(profile: HardwareProfile, policy: SelectionPolicy) -> int | None:
    usable = profile.usable_memory_bytes
    if usable is None:
        return None
    return max(0, usable + policy.reclaimable_bytes - policy.headroom_bytes - policy.reserved_bytes)


def bandwidth_gbps(profile: HardwareProfile) -> float:
    if profile.memory_bandwidth_gbps:
        return profile.memory_bandwidth_gbps
    return DEFAULT_BANDWIDTH_GBPS.get(
        profile.cpu.model, DEFAULT_BANDWIDTH_GBPS.get(profile.cpu.arch, UNKNOWN_BANDWIDTH_GBPS)
    )


def estimate_speed(candidate: Candidate, profile: HardwareProfile) -> float:
    """Generation tokens/s when decode is memory bound: every weight byte is read once per token."""
    bytes_per_token = max(candidate.shape.file_size, 1)
    return SPEED_EFFICIENCY * bandwidth_gbps(profile) * 1e9 / bytes_per_token


def _serves(candidate_task: str, wanted: str | None) -> bool:
    return wanted is None or candidate_task == wanted or (wanted == "completion" and candidate_task == "chat")


def _rank_key(a: Assessment) -> tuple[int, float, int, str]:
    params, bpw = a.candidate.quality
    total = a.memory.total if a.memory else 0
    return (-params, -bpw, total, a.candidate.id)


def _assess(
    c: Candidate,
    profile: HardwareProfile,
    policy: SelectionPolicy,
    budget: int | None,
    speeds: Mapping[str, float],
) -> Assessment:
    if not _serves(c.task, policy.task):
        return Assessment(c, "rejected", f"task is {c.task}, {policy.task} wanted")
    if c.format not in policy.backends:
        return Assessment(c, "rejected", f"no {c.format} backend on this box")
    missing = sorted(c.min_cpu_features - profile.cpu.features)
    if missing:
        return Assessment(c, "rejected", f"CPU lacks {', '.join(missing)}")
    broken = failed_tensor_types(c, policy.failed_types)
    if broken:
        reason = f"tensor type {', '.join(broken)} failed `edge-agent doctor` with this llama.cpp build"
        return Assessment(c, "rejected", reason)
    if policy.allowed is not None and not policy.allowed(c):
        return Assessment(c, "rejected", "denied by the access policy")
    runtime = policy.runtime
    if c.context_length and runtime.n_ctx > c.context_length:
        runtime = replace(runtime, n_ctx=c.context_length)
    mem = estimate(c.shape, runtime)
    speed: float | None = None
    source: SpeedSource = "n/a"
    if c.task != "embedding":
        if c.id in speeds:
            speed, source = speeds[c.id], "measured"
        else:
            speed, source = estimate_speed(c, profile), "estimated"
    if budget is None:
        return Assessment(c, "rejected", "available memory unknown", mem, speed, source)
    if mem.total > budget:
        reason = f"needs {fmt_bytes(mem.total)}, {fmt_bytes(budget)} available"
        return Assessment(c, "rejected", reason, mem, speed, source)
    pinned = policy.pin == c.id
    if policy.below is not None and c.quality >= policy.below and not pinned:
        return Assessment(c, "rejected", "throttled: stepping down to a smaller model", mem, speed, source)
    if speed is not None and speed < policy.speed_floor_tps and not pinned:
        reason = f"{speed:.1f} tok/s ({source}) is below the floor of {policy.speed_floor_tps:g} tok/s"
        return Assessment(c, "rejected", reason, mem, speed, source)
    return Assessment(c, "fits", "fits", mem, speed, source)


def select(
    profile: HardwareProfile,
    candidates: Sequence[Candidate],
    policy: SelectionPolicy = SelectionPolicy(),
    speeds: Mapping[str, float] | None = None,
) -> Selection:
    """Choose the best candidate that fits; every candidate gets a verdict and a reason."""
    budget = memory_budget(profile, policy)
    rows = [_assess(c, profile, policy, budget, speeds or {}) for c in candidates]
    fitting = sorted((r for r in rows if r.verdict == "fits"), key=_rank_key)
    chosen: Assessment | None = None
    if policy.pin is not None:
        chosen = next((r for r in fitting if r.candidate.id == policy.pin), None)
    elif fitting:
        chosen = fitting[0]
    out: list[Assessment] = []
    for r in rows:
        if chosen is not None and r is chosen:
            why = "pinned" if policy.pin else _why_best(r, fitting)
            out.append(replace(r, verdict="chosen", reason=why))
        elif r.verdict == "fits" and chosen is not None:
            out.append(replace(r, reason=_why_not(r, chosen, policy)))
        else:
            out.append(r)
    out.sort(key=lambda r: (r.verdict != "chosen", r.verdict != "fits", *_rank_key(r)))
    final = out[0] if chosen is not None else None
    return Selection(
        chosen.candidate if chosen else None,
        budget,
        tuple(out),
        _message(final, out, budget, policy),
    )


def _why_best(r: Assessment, fitting: list[Assessment]) -> str:
    if len(fitting) == 1:
        return "the only candidate that fits"
    return f"best quality that fits ({_quality_text(r.candidate)})"


def _quality_text(c: Candidate) -> str:
    return f"{c.parameters / 1e6:,.0f}M params, {c.quantization} {c.bits_per_weight:.2f} bpw"


def _why_not(r: Assessment, chosen: Assessment, policy: SelectionPolicy) -> str:
    if policy.pin:
        return f"fits; {policy.pin} is pinned"
    if r.candidate.parameters < chosen.candidate.parameters:
        return "fits; fewer parameters than the choice"
    if r.candidate.quality[1] < chosen.candidate.quality[1]:
        return "fits; lower precision than the choice"
    return "fits; tie broken by memory, then id"


def _message(
    chosen: Assessment | None, rows: list[Assessment], budget: int | None, policy: SelectionPolicy
) -> str:
    if chosen is not None:
        mem = chosen.memory.total if chosen.memory else 0
        return f"{chosen.candidate.id}: {chosen.reason}; needs {fmt_bytes(mem)} of {fmt_bytes(budget or 0)}"
    if not rows:
        return "no candidate models: install or sync one first"
    if policy.pin is not None:
        pinned = next((r for r in rows if r.candidate.id == policy.pin), None)
        if pinned is None:
            return f"pinned model {policy.pin} is not installed"
        return f"pinned model {policy.pin} cannot run here: {pinned.reason}"
    if budget is None:
        return "cannot determine the available memory"
    sized = [r for r in rows if r.memory is not None and r.memory.total > budget]
    if sized and len(sized) == sum(1 for r in rows if r.memory is not None):
        smallest = min(sized, key=lambda r: (r.memory.total if r.memory else 0, r.candidate.id))
        need = smallest.memory.total if smallest.memory else 0
        return (
            f"nothing fits: the smallest candidate, {smallest.candidate.id}, needs {fmt_bytes(need)}, "
            f"{fmt_bytes(budget)} available (after {fmt_bytes(policy.headroom_bytes)} headroom)"
        )
    reasons = sorted({r.reason for r in rows})
    return "no candidate qualifies: " + "; ".join(reasons)


# --- run-time re-selection ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observation:
    """One scheduled re-probe: when, and whether the box was under memory pressure or throttled."""

    at: float
    pressure: bool
    throttled: bool

    @property
    def stressed(self) -> bool:
        return self.pressure or self.throttled


@dataclass(frozen=True, slots=True)
class SwitchPolicy:
    down_after: int = 2
    """Consecutive stressed observations before moving to a smaller model."""
    up_after: int = 5
    """Consecutive calm observations before moving to a bigger model."""
    min_interval_s: float = 600.0
    """No move to a bigger model sooner than this after the last switch."""
    pin: str | None = None


@dataclass(frozen=True, slots=True)
class SwitchHistory:
    observations: tuple[Observation, ...] = ()
    last_switch_at: float | None = None

    def observe(self, obs: Observation, keep: int = 32) -> SwitchHistory:
        return replace(self, observations=(*self.observations, obs)[-keep:])


@dataclass(frozen=True, slots=True)
class SwitchDecision:
    switch: bool
    target: str | None
    reason: str


def observe(profile: HardwareProfile, at: float, headroom_bytes: int) -> Observation:
    usable = profile.usable_memory_bytes
    return Observation(at, usable is not None and usable < headroom_bytes, profile.throttled is True)


def _streak(history: SwitchHistory, n: int, stressed: bool) -> bool:
    tail = history.observations[-n:] if n > 0 else ()
    return len(tail) >= n and all(o.stressed == stressed for o in tail)


def should_switch(
    current: str | None,
    new: Selection,
    history: SwitchHistory,
    policy: SwitchPolicy = SwitchPolicy(),
) -> SwitchDecision:
    """Whether to replace the serving model ``current`` by ``new.choice``, with hysteresis.

    Down (to a lower-quality model) only after ``down_after`` stressed observations in a row; up only
    after ``up_after`` calm ones and ``min_interval_s`` since the last switch. A pin wins over both.
    """
    if policy.pin is not None:
        if current == policy.pin:
            return SwitchDecision(False, current, f"pinned to {policy.pin}")
        return SwitchDecision(True, policy.pin, f"pinned to {policy.pin}")
    target = new.choice
    if target is None:
        return SwitchDecision(False, current, f"keeping {current}: {new.message}")
    if target.id == current:
        return SwitchDecision(False, current, f"{current} is still the best fit")
    row = new.row(current) if current is not None else None
    if current is None or row is None:
        return SwitchDecision(
            True, target.id, f"{current or 'nothing'} is not available; loading {target.id}"
        )
    down = target.quality < row.candidate.quality
    if down:
        if _streak(history, policy.down_after, True):
            return SwitchDecision(
                True, target.id, f"memory pressure or throttling for {policy.down_after} probes in a row"
            )
        return SwitchDecision(False, current, "stress not yet sustained; waiting before moving down")
    now = history.observations[-1].at if history.observations else 0.0
    if history.last_switch_at is not None and now - history.last_switch_at < policy.min_interval_s:
        return SwitchDecision(False, current, "switched recently; waiting before moving up")
    if _streak(history, policy.up_after, False):
        return SwitchDecision(True, target.id, f"calm for {policy.up_after} probes; {target.id} fits")
    return SwitchDecision(False, current, "calm not yet sustained; waiting before moving up")


__all__ = [
    "DEFAULT_BANDWIDTH_GBPS",
    "SPEED_EFFICIENCY",
    "Assessment",
    "Candidate",
    "Observation",
    "Selection",
    "SelectionPolicy",
    "SwitchDecision",
    "SwitchHistory",
    "SwitchPolicy",
    "bandwidth_gbps",
    "candidate_from_gguf",
    "candidate_from_manifest",
    "estimate_speed",
    "failed_tensor_types",
    "memory_budget",
    "observe",
    "select",
    "should_switch",
    "tensor_types_of",
]
