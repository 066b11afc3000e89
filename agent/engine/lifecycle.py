"""What every engine reports about itself: its model, its load state, requests in flight.

Invariants: ``state`` goes ``IDLE -> LOADING -> READY`` or ``-> FAILED``; ``FAILED`` always comes
with ``load_error`` (one line naming the exception) and a :class:`agent.errors.ModelLoadError`
raised from the load (any other exception from the blocking loader is wrapped in one). With a
``guard`` (crash isolation, :mod:`agent.engine.isolation`), the model is admitted by it before the
blocking loader runs, and the loader runs inside its activation marker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from typing import Protocol

from agent.engine.base import EngineState, ModelInfo
from agent.errors import ModelLoadError

__all__ = ["EngineLifecycle", "LoadGuard"]


class LoadGuard(Protocol):
    """Crash isolation as an engine sees it (:class:`agent.engine.isolation.Isolation`)."""

    async def admit(self, info: ModelInfo) -> None:
        """Return when ``info`` may be loaded here; raise ModelLoadError (or ModelRefused) if not."""
        ...

    def activating(self, info: ModelInfo) -> AbstractContextManager[None]:
        """Held around the blocking load in this process (the crash-loop marker)."""
        ...


class EngineLifecycle:
    """The ``info`` / ``state`` / ``queue_depth`` part of the Engine protocol, and a loader."""

    def __init__(self, info: ModelInfo, guard: LoadGuard | None = None) -> None:
        self._info = info
        self._guard = guard
        self._state = EngineState.IDLE
        self._running = 0
        """Requests in flight (engines that count otherwise override ``queue_depth``)."""
        self.load_error: str | None = None

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def queue_depth(self) -> int:
        return self._running

    async def _load_with(self, executor: Executor, blocking: Callable[[], None]) -> None:
        """Run ``blocking`` on ``executor``, moving ``state`` through LOADING to READY or FAILED."""
        self._state = EngineState.LOADING
        guard = self._guard

        def guarded() -> None:
            assert guard is not None
            with guard.activating(self._info):
                blocking()

        try:
            if guard is not None:
                await guard.admit(self._info)
            await asyncio.get_running_loop().run_in_executor(executor, blocking if guard is None else guarded)
        except Exception as exc:
            self._state = EngineState.FAILED
            self.load_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"cannot load {self._info.path}: {exc}") from exc
        self._state = EngineState.READY
