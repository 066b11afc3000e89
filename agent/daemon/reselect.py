"""The scheduled re-probe (:class:`Reselector`): probe, select with hysteresis, hot-swap.

A tick never raises: failures are logged and the current model keeps serving.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any, Protocol

from agent.config import Settings
from agent.daemon.candidates import candidate_for, effective_pin, run_selection
from agent.engine.base import ModelInfo
from agent.errors import AgentError
from agent.hardware.probe import probe
from fleet.hardware import HardwareProfile
from fleet.log import get_logger
from fleet.memory import MIB
from fleet.selection import (
    SwitchDecision,
    SwitchHistory,
    SwitchPolicy,
    observe,
    should_switch,
)

log = get_logger(__name__)


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


__all__ = ["Reselector", "SwapTarget"]
