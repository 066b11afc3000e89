"""Desired deployments vs what the device holds and serves -> the actions to take. Pure.

Rules (docs/protocol.md, "Deployments"):
- The desired set is the union of the deployments of this device's groups; an entry without a
  version means the newest installed version of that model.
- A desired model that is not installed is ``Missing`` (the registry refresh fetches models; if it
  is still missing afterwards the fetch failed and is reported).
- A desired model installed but not served at that version is ``Activate``d: loaded, smoke-tested,
  then switched to. The pinned entry (else the first entry) becomes the default model.
- Switching happens only inside the deployment's maintenance window (``HH:MM-HH:MM`` UTC, may wrap
  midnight), unless it is *urgent*: the device serves no deployed model at all. Otherwise the
  action is ``Defer``red and retried at the next reconcile.
- A model version whose activation failed (smoke test, load) is held back (``failed``) until its
  retry is due (:mod:`agent.sync.retry`): the previous model keeps serving meanwhile.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, time

from registry.metadata import Deployment

_WINDOW = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


def window_bounds(window: str, what: str = "maintenance window") -> tuple[time, time]:
    """(start, end) of ``HH:MM-HH:MM``; ValueError naming ``what`` and the window when malformed."""
    m = _WINDOW.fullmatch(window)
    if m is None:
        raise ValueError(f"bad {what} {window!r}: expected HH:MM-HH:MM (24-hour, UTC)")
    return time(int(m.group(1)), int(m.group(2))), time(int(m.group(3)), int(m.group(4)))


def in_window(now: datetime, window: str | None) -> bool:
    """Whether ``now`` (UTC) falls inside ``HH:MM-HH:MM``; None means always. Start inclusive,
    end exclusive; a window whose end is before its start wraps midnight; equal ends = all day.
    The same syntax serves a deployment's maintenance window (activation) and the box's
    ``[hub] download_window`` (transfer, :mod:`agent.sync.gate`)."""
    if window is None:
        return True
    start, end = window_bounds(window)
    t = now.time().replace(second=0, microsecond=0, tzinfo=None)
    if start == end:
        return True
    if start < end:
        return start <= t < end
    return t >= start or t < end


def _version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.+_-]", version))


@dataclass(frozen=True, slots=True)
class Activate:
    model: str
    version: str
    make_default: bool


@dataclass(frozen=True, slots=True)
class Defer:
    model: str
    version: str
    window: str


@dataclass(frozen=True, slots=True)
class Missing:
    model: str
    version: str | None


Action = Activate | Defer | Missing


def desired_models(deployments: Iterable[Deployment]) -> list[tuple[str, str | None, bool, str | None]]:
    """``(model, version, pin, window)`` in deployment order, first mention wins."""
    seen: dict[str, tuple[str, str | None, bool, str | None]] = {}
    for d in deployments:
        for e in d.models:
            if e.model not in seen:
                seen[e.model] = (e.model, e.version, e.pin, d.maintenance_window)
            elif e.pin:
                model, version, _, window = seen[e.model]
                seen[e.model] = (model, version, True, window)
    return list(seen.values())


def plan(
    deployments: Iterable[Deployment],
    installed: Iterable[tuple[str, str]],
    serving: Mapping[str, str],
    default: str | None,
    now: datetime,
    failed: Iterable[tuple[str, str]] = (),
) -> list[Action]:
    """The actions that bring the device to its deployments.

    ``installed``: (model, version) pairs in the store; ``serving``: model -> version in the pool;
    ``default``: the model id the pool serves by default; ``failed``: activations held back (failed,
    retry not due yet).
    """
    wanted = desired_models(deployments)
    if not wanted:
        return []
    versions: dict[str, list[str]] = {}
    for model_id, installed_version in installed:
        versions.setdefault(model_id, []).append(installed_version)
    failed_set = set(failed)
    default_model = next((w[0] for w in wanted if w[2]), wanted[0][0])
    urgent = not any(serving.get(w[0]) is not None for w in wanted)
    actions: list[Action] = []
    for model, version, _pin, window in wanted:
        have = versions.get(model, [])
        target: str | None
        if version is None:
            target = max(have, key=_version_key) if have else None
        else:
            target = version if version in have else None
        if target is None:
            actions.append(Missing(model, version))
            continue
        is_default = model == default_model
        if serving.get(model) == target and (not is_default or default == model):
            continue
        if (model, target) in failed_set:
            continue
        if not urgent and not in_window(now, window):
            actions.append(Defer(model, target, window or ""))
            continue
        actions.append(Activate(model, target, is_default))
    # The default goes first: it is what serves requests.
    actions.sort(key=lambda a: not (isinstance(a, Activate) and a.make_default))
    return actions


__all__ = ["Action", "Activate", "Defer", "Missing", "desired_models", "in_window", "plan", "window_bounds"]
