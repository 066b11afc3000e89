"""The rollout controller: a periodic task of ``edge-hub serve`` (role ``all``).

Each tick, for every active rollout stored in the hub database:

- ``starting``: sign the group's deployment with the model at the previous version for every box
  and the first wave's boxes at the new version (a signed :class:`~registry.metadata.WaveEntry`),
  then ``running``;
- ``running``: read the boxes' reported state, compute the wave's status and decide
  (:func:`hub.rollout.criteria.decide`): wait, advance (sign the next wave's boxes in), complete
  (sign the new version for the whole group, no waves), pause, or abort;
- ``aborting`` (the operator's ``abort`` or an automatic one): sign the previous version for
  every box, no waves (the moved boxes roll back), then ``rolling_back`` until no box that is
  online serves the new version any more: ``rolled_back``.
- ``paused``: nothing moves; ``edge-hub rollout resume`` makes it ``running`` again.

Invariants: every state is stored before the next tick, so a restarted hub resumes from the
database (a signing interrupted before its state was stored is simply done again: signing the same
deployment twice is harmless); every decision goes to the rollout log and the hub's events
(:meth:`RolloutStore.log`); only this controller signs rollout deployments (the CLI only writes
requests into the database).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fleet.log import get_logger
from hub.rollout.criteria import Box, baseline_of, box_status, decide
from hub.rollout.store import Rollout, RolloutStore
from hub.sync.meta import repo_lock
from hub.sync.store import HubStore
from registry.metadata import WaveEntry

log = get_logger(__name__)


def inventory(store: HubStore) -> dict[str, tuple[dict[str, Any] | None, bool]]:
    """device -> (last reported state as JSON values, online)."""
    return {
        r.device: (json.loads(r.state.encode()) if r.state is not None else None, r.online)
        for r in store.devices()
    }


def boxes_of(rollout: Rollout, inv: dict[str, tuple[dict[str, Any] | None, bool]]) -> list[Box]:
    out = []
    for device, wave in sorted(rollout.devices.items(), key=lambda kv: (kv[1], kv[0])):
        state, online = inv.get(device, (None, False))
        out.append(box_status(device, wave, state, online, rollout.model, rollout.version, rollout.previous))
    return out


class RolloutController:
    """Drives the stored rollouts; ``sign(group, model, base_version, wave)`` signs a deployment."""

    def __init__(
        self,
        store: HubStore,
        sign: Callable[[str, str, str, WaveEntry | None, Callable[[], bool]], bool],
        now: Callable[[], float] = time.time,
    ) -> None:
        self.hub_store = store
        self.rollouts = RolloutStore(store)
        self.sign = sign
        self.now = now

    def tick(self) -> None:
        inv = inventory(self.hub_store)
        for rollout in self.rollouts.active():
            try:
                self._step(rollout, inv)
            except Exception as exc:  # one rollout's trouble never stops the others or the hub
                log.error("rollout_step_failed", rollout=rollout.id, error=repr(exc))

    def _sign(self, r: Rollout, base_version: str, wave: WaveEntry | None) -> bool:
        """Sign unless the rollout stopped being active meanwhile (checked under the repository
        lock: an operator's forced push ends it under that lock, hub/rollout/guard.py)."""
        from hub.rollout.guard import still_active

        return self.sign(r.group, r.model, base_version, wave, lambda: still_active(self.rollouts, r.id))

    def _wave_entry(self, r: Rollout, wave: int) -> WaveEntry:
        devices = tuple(sorted(d for d, w in r.devices.items() if w <= wave))
        return WaveEntry(r.model, r.version, devices)

    def _step(self, r: Rollout, inv: dict[str, tuple[dict[str, Any] | None, bool]]) -> None:
        now = self.now()
        if r.state == "starting":
            if not self._sign(r, r.previous, self._wave_entry(r, 0)):
                return
            first = sorted(d for d, w in r.devices.items() if w == 0)
            self.rollouts.transition(
                r,
                "started",
                f"{r.model} {r.previous} -> {r.version}, wave 1 of {len(r.waves)}: {', '.join(first)}",
                now,
                state="running",
                wave=0,
                wave_started=now,
            )
        elif r.state == "aborting":
            if not self._sign(r, r.previous, None):
                return
            self.rollouts.transition(
                r,
                "rolling_back",
                f"every box of {r.group} signed back to {r.model} {r.previous}",
                now,
                state="rolling_back",
            )
        elif r.state == "rolling_back":
            still = [b.device for b in boxes_of(r, inv) if b.status == "moved" and b.online]
            if not still:
                detail = f"no online box serves {r.model} {r.version} any more"
                self.rollouts.transition(r, "rolled_back", detail, now, state="rolled_back")
        elif r.state == "running":
            self._run(r, inv, now)

    def _run(self, r: Rollout, inv: dict[str, tuple[dict[str, Any] | None, bool]], now: float) -> None:
        group_states = [s for s, _ in inv.values() if s is not None and r.group in (s.get("groups") or [])]
        fresh = baseline_of(group_states, r.model, r.previous)
        baseline = fresh if fresh.get("samples", 0) >= r.baseline.get("samples", 0) else r.baseline
        if baseline != r.baseline:
            self.rollouts.update(r.id, baseline=baseline, now=now)
        boxes = boxes_of(r, inv)
        d = decide(
            boxes,
            r.wave,
            len(r.waves) - 1,
            r.criteria,
            baseline,
            now - r.wave_started,
            r.waived_wave == r.wave,
        )
        detail = d.reason + ("; " + "; ".join(d.checks) if d.checks else "")
        if d.action == "advance":
            wave = r.wave + 1
            if not self._sign(r, r.previous, self._wave_entry(r, wave)):
                return
            added = sorted(dev for dev, w in r.devices.items() if w == wave)
            self.rollouts.transition(
                r,
                "wave_advanced",
                f"wave {wave + 1} of {len(r.waves)}: {', '.join(added)}; {detail}",
                now,
                wave=wave,
                wave_started=now,
                reason="",
            )
        elif d.action == "complete":
            if not self._sign(r, r.version, None):
                return
            done = f"{r.group} holds {r.model} {r.version}; {detail}"
            self.rollouts.transition(r, "completed", done, now, state="completed", reason="")
        elif d.action == "pause":
            self.rollouts.transition(r, "paused", detail, now, state="paused", reason=d.reason)
        elif d.action == "abort":
            self.rollouts.transition(r, "aborted", detail, now, state="aborting", reason=d.reason)
            r.state = "aborting"
            self._step(r, inv)


def repo_signer(
    repo_dir: Path, passphrase: bytes | None
) -> Callable[[str, str, str, WaveEntry | None, Callable[[], bool]], bool]:
    """Signs with the repository's keys under the repository lock (as ``edge-hub deploy`` does),
    only when ``still_wanted()`` holds under that lock; returns whether it signed."""

    def sign(
        group: str, model: str, base_version: str, wave: WaveEntry | None, still_wanted: Callable[[], bool]
    ) -> bool:
        from registry.publish import set_rollout
        from registry.repository import Repository

        with repo_lock(repo_dir):
            if not still_wanted():
                return False
            set_rollout(Repository.open(repo_dir, passphrase), group, model, base_version, wave)
            return True

    return sign


__all__ = ["RolloutController", "boxes_of", "inventory", "repo_signer"]
