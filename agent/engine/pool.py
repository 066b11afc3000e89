"""The models this daemon serves, and which engine answers a request for a model id.

Invariant: ``resolve`` never returns an engine that failed to load; a request naming no model
goes to the default (selected) model; an unknown id raises :class:`NotFound` listing what exists.
"""

from __future__ import annotations

import asyncio
import contextlib

from agent.engine.base import Engine, EngineState, ModelInfo
from agent.errors import EngineError, ModelLoadError, ModelNotReady, NotFound
from agent.log import get_logger

log = get_logger(__name__)


class ModelPool:
    """Engines by model id, with one default. Loading happens in the background."""

    def __init__(self) -> None:
        self._engines: dict[str, Engine] = {}
        self._default: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def add(self, engine: Engine, *, default: bool = False) -> None:
        self._engines[engine.info.id] = engine
        if default or self._default is None:
            self._default = engine.info.id

    def start_loading(self) -> None:
        """Begin loading every engine that is idle; errors are logged and kept on the engine."""
        for engine in self._engines.values():
            if engine.state is EngineState.IDLE:
                task = asyncio.get_running_loop().create_task(self._load(engine))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _load(self, engine: Engine) -> None:
        log.info("model_loading", model=engine.info.id, path=str(engine.info.path))
        try:
            await engine.load()
        except ModelLoadError as exc:
            log.error("model_load_failed", model=engine.info.id, error=str(exc))
            return
        log.info("model_ready", model=engine.info.id)

    async def wait_loaded(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def default_id(self) -> str | None:
        return self._default

    def models(self) -> list[ModelInfo]:
        return [e.info for e in self._engines.values() if e.state is not EngineState.FAILED]

    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    def resolve(self, model_id: str | None) -> Engine:
        key = model_id or self._default
        if key is None:
            raise ModelNotReady("no model is installed; import or sync one first", retry_after=30.0)
        engine = self._engines.get(key)
        if engine is None:
            known = ", ".join(sorted(self._engines)) or "none"
            raise NotFound(f"model {key!r} is not served here (available: {known})", param="model")
        if engine.state is EngineState.FAILED:
            raise EngineError(f"model {key!r} failed to load")
        return engine

    @property
    def loading(self) -> bool:
        return any(e.state in (EngineState.LOADING, EngineState.IDLE) for e in self._engines.values())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for engine in self._engines.values():
            await engine.close()


__all__ = ["ModelPool"]
