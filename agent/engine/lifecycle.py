"""What every engine reports about itself: its model, its load state, requests in flight.

Invariants: ``state`` goes ``IDLE -> LOADING -> READY`` or ``-> FAILED``; ``FAILED`` always comes
with ``load_error`` (one line naming the exception) and a :class:`agent.errors.ModelLoadError`
raised from the load (any other exception from the blocking loader is wrapped in one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor

from agent.engine.base import EngineState, ModelInfo
from agent.errors import ModelLoadError

__all__ = ["EngineLifecycle"]


class EngineLifecycle:
    """The ``info`` / ``state`` / ``queue_depth`` part of the Engine protocol, and a loader."""

    def __init__(self, info: ModelInfo) -> None:
        self._info = info
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
        try:
            await asyncio.get_running_loop().run_in_executor(executor, blocking)
        except Exception as exc:
            self._state = EngineState.FAILED
            self.load_error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(f"cannot load {self._info.path}: {exc}") from exc
        self._state = EngineState.READY
