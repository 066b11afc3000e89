"""Pure rollout logic: wave sizes, box order, the state of each box, the controller's decision.

Decision rules for the current wave (docs/operations.md, "Staged rollouts"), in this order:
1. **Abort and roll back** when any box moved so far reports the activation of the new version
   failed (load or smoke test: ``health[].activation`` or a ``failing`` entry), or when the error
   rate on the new version (5xx / requests, over the moved boxes, once ``min_requests`` requests
   were seen) exceeds ``max_error_rate``.
2. **Pause** (a running rollout, unless the operator resumed this wave) when the moved boxes'
   median tokens/s is more than ``max_slowdown`` (fraction) below the previous version's baseline,
   or their p95 time to first token more than ``max_ttft_increase`` above it; each needs
   ``min_samples`` samples on both sides, otherwise that comparison is not made (and says so).
   Also when every box of the wave is offline past ``wave_timeout_s``.
3. **Advance** when every box of the wave moved (a box still offline ``wave_timeout_s`` after the
   wave started is skipped: it takes the version when the rollout completes) and the wave has
   ``min_samples`` tokens/s samples on the new version or ``soak_s`` passed since the wave started.
   After the last wave: **complete**.
"""

from __future__ import annotations

import hashlib
import math
import re
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_CRITERIA: dict[str, float] = {
    "max_slowdown": 0.20,
    "max_ttft_increase": 0.50,
    "max_error_rate": 0.05,
    "min_requests": 20.0,
    "min_samples": 20.0,
    "soak_s": 600.0,
    "wave_timeout_s": 3600.0,
}


def parse_waves(spec: str, boxes: int) -> list[int]:
    """``1%,10%,50%,100%`` or counts ``1,5,all`` -> cumulative box counts, strictly increasing,
    the last = ``boxes``. A percentage rounds up (at least one box). ValueError names the problem."""
    if boxes < 1:
        raise ValueError("the group has no boxes the hub knows of")
    out: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if part == "all":
            n = boxes
        elif m := re.fullmatch(r"(\d+(?:\.\d+)?)%", part):
            pct = float(m.group(1))
            if not 0 < pct <= 100:
                raise ValueError(f"wave {part!r}: a percentage is in (0, 100]")
            n = max(1, math.ceil(boxes * pct / 100))
        elif part.isdigit() and int(part) > 0:
            n = min(int(part), boxes)
        else:
            raise ValueError(f"wave {part!r}: expected N%, a count or 'all'")
        if out and n <= out[-1]:
            continue  # a wave that adds no box (small groups): merged
        out.append(n)
    if not out or out[-1] != boxes:
        out.append(boxes)  # the last wave always covers the whole group
    return out


def box_order(devices: Iterable[str], salt: str) -> list[str]:
    """A stable pseudo-random order (sha256 of salt and id): waves are spread, not alphabetical."""
    return sorted(devices, key=lambda d: hashlib.sha256(f"{salt}:{d}".encode()).hexdigest())


@dataclass(frozen=True, slots=True)
class Box:
    device: str
    wave: int
    status: str
    """``moved`` (serves the new version), ``failed``, ``pending``, ``offline``, ``rolled_back``
    (serves the previous version again after an abort)"""
    online: bool
    health: Mapping[str, Any] = field(default_factory=dict)
    """the box's health entry for the new version ({} when none)"""
    detail: str = ""


def _health(state: Mapping[str, Any] | None, model: str, version: str) -> dict[str, Any]:
    for h in (state or {}).get("health", []) or []:
        if isinstance(h, Mapping) and h.get("model") == model and h.get("version") == version:
            return dict(h)
    return {}


def box_status(
    device: str,
    wave: int,
    state: Mapping[str, Any] | None,
    online: bool,
    model: str,
    version: str,
    previous: str,
) -> Box:
    """Where one box stands, from its last reported state (``serving``, ``health``, ``failing``)."""
    serving = ((state or {}).get("serving") or {}).get(model)
    h = _health(state, model, version)
    activation = h.get("activation", "")
    failing = [
        f
        for f in (state or {}).get("failing", []) or []
        if f.get("model") == model and f.get("version") == version
    ]
    if activation and activation != "passed" and serving != version:
        return Box(device, wave, "failed", online, h, str(activation))
    if failing and serving != version:
        return Box(device, wave, "failed", online, h, str(failing[0].get("error", "activation failed"))[:200])
    if serving == version:
        return Box(device, wave, "moved", online, h)
    if not online:
        return Box(device, wave, "offline", online, h)
    return Box(device, wave, "pending", online, h, f"serves {serving or 'nothing'}")


def baseline_of(states: Iterable[Mapping[str, Any] | None], model: str, previous: str) -> dict[str, Any]:
    """The previous version's numbers over the group: median tokens/s and median p95 TTFT of the
    boxes that report them, with the sample counts."""
    tps: list[float] = []
    ttft: list[float] = []
    samples = 0
    for state in states:
        h = _health(state, model, previous)
        if h.get("tokens_per_s") is not None and h.get("samples", 0) > 0:
            tps.append(float(h["tokens_per_s"]))
            samples += int(h.get("samples", 0))
        if h.get("ttft_p95_s") is not None:
            ttft.append(float(h["ttft_p95_s"]))
    out: dict[str, Any] = {"samples": samples}
    if tps:
        out["tokens_per_s"] = statistics.median(tps)
    if ttft:
        out["ttft_p95_s"] = statistics.median(ttft)
    return out


def measured(boxes: Iterable[Box]) -> dict[str, Any]:
    """The new version's numbers over the moved boxes."""
    moved = [b for b in boxes if b.status == "moved"]
    requests = sum(int(b.health.get("requests", 0)) for b in moved)
    errors = sum(int(b.health.get("errors", 0)) for b in moved)
    tps = [float(b.health["tokens_per_s"]) for b in moved if b.health.get("tokens_per_s") is not None]
    ttft = [float(b.health["ttft_p95_s"]) for b in moved if b.health.get("ttft_p95_s") is not None]
    out: dict[str, Any] = {
        "requests": requests,
        "errors": errors,
        "error_rate": errors / requests if requests else None,
        "samples": sum(int(b.health.get("samples", 0)) for b in moved),
    }
    out["tokens_per_s"] = statistics.median(tps) if tps else None
    out["ttft_p95_s"] = statistics.median(ttft) if ttft else None
    return out


@dataclass(frozen=True, slots=True)
class Decision:
    action: str
    """``wait``, ``advance``, ``complete``, ``pause``, ``abort``"""
    reason: str
    checks: tuple[str, ...] = ()
    """each criterion with its measured value, for the status view"""


@dataclass(frozen=True)
class _Speed:
    """A speed figure compared with the previous version's: its label, how a value is shown, and
    which way is better."""

    label: str
    shown: str
    higher_is_better: bool


_TOKENS_PER_S = _Speed("tokens/s", "{:.1f}", higher_is_better=True)
_TTFT = _Speed("p95 TTFT", "{:.3f}s", higher_is_better=False)


def _compare(spec: _Speed, now: float | None, before: Any, limit: float, checks: list[str]) -> str | None:
    """Add the comparison of ``now`` (None: not enough samples) with the baseline's ``before`` to
    ``checks``; the reason to pause when ``now`` is worse than ``before`` by more than ``limit``
    (a fraction), else None."""
    if now is None or not before:
        checks.append(f"{spec.label}: not enough samples for a comparison")
        return None
    ratio = now / float(before)
    worse = 1 - ratio if spec.higher_is_better else ratio - 1
    sign, side = ("-", "below") if spec.higher_is_better else ("+", "above")
    checks.append(
        f"{spec.label} {spec.shown.format(now)} vs {spec.shown.format(float(before))} "
        f"({ratio - 1:+.0%}, max {sign}{limit:.0%})"
    )
    return (
        f"{spec.label} {worse:.0%} {side} the previous version (max {limit:.0%})" if worse > limit else None
    )


def decide(
    boxes: list[Box],
    wave: int,
    last_wave: int,
    criteria: Mapping[str, float],
    baseline: Mapping[str, Any],
    wave_age_s: float,
    waived: bool,
) -> Decision:
    """The controller's decision for a running rollout whose current wave is ``wave``."""
    c = {**DEFAULT_CRITERIA, **criteria}
    sofar = [b for b in boxes if b.wave <= wave]
    failed = [b for b in sofar if b.status == "failed"]
    if failed:
        names = ", ".join(f"{b.device} ({b.detail})" for b in failed[:5])
        return Decision("abort", f"activation failed on {names}")
    m = measured(sofar)
    checks: list[str] = []
    if m["requests"] >= c["min_requests"] and m["error_rate"] is not None:
        checks.append(f"error rate {m['error_rate']:.3f} (max {c['max_error_rate']:.3f})")
        if m["error_rate"] > c["max_error_rate"]:
            return Decision(
                "abort", f"error rate {m['error_rate']:.3f} > {c['max_error_rate']:.3f}", tuple(checks)
            )
    else:
        checks.append(f"error rate: {m['requests']} of {int(c['min_requests'])} requests seen")
    enough = m["samples"] >= c["min_samples"] and baseline.get("samples", 0) >= c["min_samples"]
    for spec, key, limit in (
        (_TOKENS_PER_S, "tokens_per_s", "max_slowdown"),
        (_TTFT, "ttft_p95_s", "max_ttft_increase"),
    ):
        worse = _compare(spec, m[key] if enough else None, baseline.get(key), c[limit], checks)
        if worse is not None and not waived:
            return Decision("pause", worse, tuple(checks))
    current = [b for b in boxes if b.wave == wave]
    timed_out = wave_age_s >= c["wave_timeout_s"]
    waiting = [b for b in current if b.status == "pending" or (b.status == "offline" and not timed_out)]
    if current and all(b.status == "offline" for b in current) and timed_out:
        return Decision("pause", f"every box of wave {wave + 1} is offline", tuple(checks))
    if waiting:
        return Decision("wait", f"{len(waiting)} box(es) of wave {wave + 1} not moved yet", tuple(checks))
    wave_samples = measured(current)["samples"]
    if wave_samples < c["min_samples"] and wave_age_s < c["soak_s"]:
        return Decision(
            "wait",
            f"soaking: {wave_samples} of {int(c['min_samples'])} samples, "
            f"{wave_age_s:.0f}s of {c['soak_s']:.0f}s",
            tuple(checks),
        )
    if wave >= last_wave:
        return Decision("complete", "every wave healthy", tuple(checks))
    return Decision("advance", f"wave {wave + 1} healthy", tuple(checks))


__all__ = [
    "DEFAULT_CRITERIA",
    "Box",
    "Decision",
    "baseline_of",
    "box_order",
    "box_status",
    "decide",
    "measured",
    "parse_waves",
]
