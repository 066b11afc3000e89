"""The models this daemon serves: which are loaded, which engine answers a request, hot swaps.

Several models may be loaded at once within a memory budget (and a count limit). A model that is
neither the default nor pinned is unloaded after ``keep_alive_s`` without use, and loaded again
on demand (the request that finds it unloaded gets 503 with ``Retry-After`` while it loads).
When space is needed, idle unpinned models are evicted least recently used first.

Hot swap (:meth:`ModelPool.swap`, the selection's entry point): the new model loads next to the
current one, must pass a smoke test (a few greedy tokens, or one embedding), and only then
becomes the default. Requests already running on the previous model finish on it: the previous
engine is *retired*, no longer handed out, and closed once its queue is empty (or after
``drain_timeout_s``). A new model that fails to load or fails its smoke test is closed and the
previous one keeps serving: that is the rollback, and the swap raises :class:`SwapFailed`.

Cold swap: when the new model fits the budget only in place of the current default (a small box
that cannot hold two models), and ``cold_swap`` is on, the swap drains and unloads the current
default first (requests meanwhile get 503 with ``Retry-After``: the model is switching), then loads
and smoke-tests the new one; if that fails, the previous model is loaded again before
:class:`SwapFailed` is raised. A pinned default is never unloaded for a cold swap.

Invariants:
- ``resolve`` never returns an engine that failed to load, nor a retired one; a request naming
  no model goes to the default of its task (:meth:`ModelPool.default_for`: a chat request to the
  best served model whose task is ``chat``, anything else to the default); an unknown id raises
  :class:`NotFound` listing what exists.
- the default model and pinned models are never unloaded for idleness nor evicted; the chat
  default is loaded at start and never unloaded for idleness (it may be evicted for room).
- the sum of the estimates of loaded models never exceeds the budget because of a load this pool
  started (models added already constructed are accounted for too).
- swaps are serialised; the default changes only after the new engine passed its smoke test.
- during a cold swap no other model starts loading (its memory is the new model's).

The pool works through the :class:`agent.engine.base.Engine` protocol only; it creates engines
with the ``factory`` it is given (``app.py`` chooses the concrete class).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent.config import PoolSettings
from agent.engine.base import CompletionRequest, Engine, EngineState, ModelInfo, SamplingParams
from agent.errors import EngineError, ModelLoadError, ModelNotReady, ModelRefused, NotFound, Overloaded
from fleet.log import get_logger

log = get_logger(__name__)

EngineFactory = Callable[[ModelInfo], Engine]
SmokeTest = Callable[[Engine], Awaitable[None]]
MemoryEstimate = Callable[[ModelInfo], int]
Listener = Callable[[str, str], None]
"""Called with (event, model id); events: ``loaded``, ``unloaded``, ``swapped``, ``swap_failed``,
``removed``."""

SMOKE_PROMPT = "The capital of France is"


class SwapFailed(EngineError):
    """The new model did not load or failed its smoke test; the previous model keeps serving."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class SmokeTestFailed(EngineError):
    """A freshly loaded model did not produce a sane answer."""


async def smoke_generate(engine: Engine) -> None:
    """A completion model must produce a few tokens and a clean finish; an embedding model a vector."""
    if engine.info.task == "embedding":
        embed = getattr(engine, "embed", None)
        if embed is None:
            return
        result = await embed(["smoke test"])
        vectors = getattr(result, "vectors", None)
        if not vectors or not vectors[0]:
            raise SmokeTestFailed(f"model {engine.info.id} returned no embedding")
        return
    request = CompletionRequest(
        prompt=SMOKE_PROMPT,
        max_tokens=4,
        sampling=SamplingParams(temperature=0.0, top_k=1, seed=0),
        request_id="smoke-test",
    )
    final = None
    async for chunk in engine.generate(request):
        if chunk.finish_reason is not None:
            final = chunk
    if final is None or final.finish_reason not in ("stop", "length"):
        reason = final.finish_reason if final is not None else "no final chunk"
        raise SmokeTestFailed(f"model {engine.info.id} smoke test ended with {reason}")
    if final.usage is None or final.usage.completion_tokens < 1:
        raise SmokeTestFailed(f"model {engine.info.id} produced no tokens in its smoke test")


def size_estimate(info: ModelInfo) -> int:
    """Default memory estimate: the model file's size (weights are mapped whole)."""
    return info.size_bytes


def default_memory_budget(fraction: float = 0.75, limit_bytes: int | None = None) -> int:
    """``fraction`` of the memory this process may use: ``limit_bytes`` (its cgroup's limit, as the
    hardware probe reads it; e.g. the unit's ``MemoryMax=``) when lower than physical RAM."""
    import psutil

    total = psutil.virtual_memory().total
    limit = min(total, limit_bytes) if limit_bytes else total
    return int(limit * fraction)


def pool_options(settings: PoolSettings, limit_bytes: int | None = None) -> dict[str, Any]:
    """``ModelPool`` keyword arguments from the ``[pool]`` settings and the cgroup memory limit."""
    budget = settings.memory_budget_mb
    return {
        "memory_budget": (budget << 20) if budget is not None else default_memory_budget(0.75, limit_bytes),
        "max_loaded": settings.max_loaded,
        "keep_alive_s": settings.keep_alive_s,
        "smoke_test": smoke_generate if settings.smoke_test else None,
        "drain_timeout_s": settings.drain_timeout_s,
        "cold_swap": settings.cold_swap,
    }


@dataclass
class _Entry:
    info: ModelInfo
    engine: Engine | None = None
    pinned: bool = False
    last_used: float = 0.0
    task: asyncio.Task[None] | None = None
    error: str | None = None
    broken: bool = False
    """The engine raised something other than ModelLoadError while loading: it was closed."""

    @property
    def loaded(self) -> bool:
        """Holding (or acquiring) memory: loading or ready. A constructed, never-loaded engine is not."""
        if self.engine is None:
            return False
        return self.task is not None or self.engine.state in (EngineState.READY, EngineState.LOADING)


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """What operators see about one model (``/admin/status``, ``/metrics``)."""

    id: str
    state: str
    """``ready``, ``loading``, ``failed``, ``unloaded`` or ``retiring``."""
    default: bool
    pinned: bool
    memory_bytes: int
    """Estimated memory while loaded (0 when unloaded)."""
    size_bytes: int
    queue_depth: int
    idle_s: float | None
    format: str
    task: str
    path: str
    error: str | None = None


@dataclass(frozen=True, slots=True)
class SwapResult:
    previous: str | None
    current: str
    load_s: float
    smoke_s: float


@dataclass
class _Retiring:
    engine: Engine
    last_used: float
    """When the pool last handed this engine out; requests may still be on their way to it."""
    since: float
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class ModelPool:
    """Engines by model id, one default, a memory budget (see the module docstring)."""

    def __init__(
        self,
        factory: EngineFactory | None = None,
        *,
        memory_budget: int | None = None,
        max_loaded: int = 4,
        keep_alive_s: float = 300.0,
        smoke_test: SmokeTest | None = smoke_generate,
        smoke_timeout_s: float = 120.0,
        estimate: MemoryEstimate = size_estimate,
        drain_timeout_s: float = 300.0,
        settle_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        cold_swap: bool = True,
    ) -> None:
        self._factory = factory
        self.memory_budget = memory_budget
        self.max_loaded = max_loaded
        self.keep_alive_s = keep_alive_s
        self._smoke = smoke_test
        self._smoke_timeout_s = smoke_timeout_s
        self._estimate = estimate
        self._drain_timeout_s = drain_timeout_s
        self._settle_s = settle_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._default: str | None = None
        self._retiring: list[_Retiring] = []
        self._swap_lock = asyncio.Lock()
        self._listeners: list[Listener] = []
        self.cold_swap = cold_swap
        self._switching: set[str] = set()
        """Model ids unloaded by a cold swap in progress: not loaded again until it ends."""
        self.swaps: Counter[str] = Counter()
        """Outcomes of :meth:`swap`: ``ok``, ``load_failed``, ``smoke_failed``, ``over_budget``;
        ``cold`` counts the swaps (of any outcome) that replaced the default in place."""

    # -- registration ---------------------------------------------------------------------------

    def add(self, engine: Engine, *, default: bool = False, pinned: bool = False) -> None:
        """Serve an already constructed engine (loaded by :meth:`start_loading`)."""
        info = engine.info
        self._entries[info.id] = _Entry(info, engine, pinned=pinned, last_used=self._clock())
        if default or self._default is None:
            self._default = info.id

    def register(self, info: ModelInfo, *, default: bool = False, pinned: bool = False) -> None:
        """Serve ``info`` on demand: the pool's factory builds its engine when it is first needed."""
        if self._factory is None:
            raise ModelLoadError("this pool has no engine factory; use add() with a constructed engine")
        self._entries[info.id] = _Entry(info, None, pinned=pinned)
        if default or self._default is None:
            self._default = info.id

    async def remove(self, model_id: str) -> bool:
        """Stop serving ``model_id`` (a model deleted from the store, or no longer deployed).

        New requests for it get 404; requests in flight finish on its engine, which drains and
        closes like a retired one; a load in progress is awaited first. The default model is
        refused (:class:`EngineError`): select another one first. Returns False when the model
        is not served here.
        """
        async with self._swap_lock:
            entry = self._entries.get(model_id)
            if entry is None:
                return False
            if model_id == self._default:
                raise EngineError(f"model {model_id!r} is the default model; select another one first")
            del self._entries[model_id]
            if entry.task is not None:
                await asyncio.gather(entry.task, return_exceptions=True)
            if entry.engine is not None:
                self._retire(entry.engine, entry.last_used)
            log.info("model_removed", model=model_id)
            self._emit("removed", model_id)
            return True

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _emit(self, event: str, model_id: str) -> None:
        for listener in self._listeners:
            try:
                listener(event, model_id)
            except Exception:  # a listener must not break the pool
                log.exception("pool_listener_failed", pool_event=event, model=model_id)

    # -- loading --------------------------------------------------------------------------------

    def start_loading(self) -> None:
        """Load, in the background, the added engines and the default and pinned models.

        Models that do not fit the budget stay unloaded (logged); loading errors are kept on the entry.
        """
        order = sorted(self._entries.values(), key=lambda e: (e.info.id != self._default, not e.pinned))
        defaults = {self._default, self.default_for("chat")}
        for entry in order:
            wanted = entry.engine is not None or entry.pinned or entry.info.id in defaults
            idle = entry.engine is None or entry.engine.state is EngineState.IDLE
            if wanted and idle and entry.task is None and not entry.broken:
                try:
                    self._begin_load(entry)
                except Overloaded as exc:
                    entry.error = str(exc)
                    log.warning("model_not_loaded", model=entry.info.id, reason=str(exc))

    def _begin_load(self, entry: _Entry) -> None:
        if self._switching:
            raise ModelNotReady(
                f"model {entry.info.id!r} is not loaded while the default model is being replaced",
                retry_after=5.0,
            )
        freeing = self._make_room(entry.info, exclude=entry.info.id)
        if entry.engine is None or entry.engine.state is not EngineState.IDLE:
            if self._factory is None:
                raise ModelLoadError(f"model {entry.info.id!r} is unloaded and this pool cannot rebuild it")
            entry.engine = self._factory(entry.info)
        entry.error = None
        entry.last_used = self._clock()
        task = asyncio.get_running_loop().create_task(self._load(entry, entry.engine, freeing))
        entry.task = task

    async def _load(self, entry: _Entry, engine: Engine, freeing: list[asyncio.Task[None]]) -> None:
        log.info("model_loading", model=engine.info.id, path=str(engine.info.path))
        try:
            if freeing:  # evicted models release their memory first
                await asyncio.gather(*freeing, return_exceptions=True)
            await engine.load()
        except ModelLoadError as exc:
            entry.error = str(exc)
            log.error("model_load_failed", model=engine.info.id, error=str(exc))
            self._load_next_chat_default(entry)
            return
        except Exception as exc:  # an engine bug: contain it, never leave the model "loading"
            entry.error = f"{type(exc).__name__}: {exc}"
            entry.broken = True
            log.exception("model_load_crashed", model=engine.info.id)
            entry.engine = None
            with contextlib.suppress(Exception):
                await engine.close()
            self._load_next_chat_default(entry)
            return
        finally:
            entry.task = None
        log.info("model_ready", model=engine.info.id)
        self._emit("loaded", engine.info.id)

    def _load_next_chat_default(self, failed: _Entry) -> None:
        """A chat model failed to load: the next chat default (if any) starts loading now."""
        if failed.info.task != "chat":
            return
        nxt = self._entries.get(self.default_for("chat") or "")
        if nxt is None or nxt is failed or nxt.task is not None or nxt.broken:
            return
        if nxt.engine is None or nxt.engine.state is EngineState.IDLE:
            with contextlib.suppress(Overloaded, ModelNotReady, ModelLoadError):
                self._begin_load(nxt)

    async def wait_loaded(self) -> None:
        """Wait until no load is in progress."""
        while tasks := [e.task for e in self._entries.values() if e.task is not None]:
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- memory ---------------------------------------------------------------------------------

    def memory_of(self, model_id: str) -> int:
        entry = self._entries.get(model_id)
        return self._estimate(entry.info) if entry is not None and entry.loaded else 0

    def memory_used(self) -> int:
        loaded = sum(self._estimate(e.info) for e in self._entries.values() if e.loaded)
        return loaded + sum(self._estimate(r.engine.info) for r in self._retiring)

    def _loaded_count(self) -> int:
        return sum(1 for e in self._entries.values() if e.loaded) + len(self._retiring)

    def _evictable(self, exclude: str) -> list[_Entry]:
        return sorted(
            (
                e
                for e in self._entries.values()
                if e.loaded
                and e.info.id not in (exclude, self._default)
                and not e.pinned
                and e.task is None
                and e.engine is not None
                and e.engine.queue_depth == 0
            ),
            key=lambda e: e.last_used,
        )

    def _would_fit(self, info: ModelInfo, gone: list[_Entry]) -> bool:
        """Whether ``info`` fits the budget and the count once ``gone`` are unloaded (engines
        already retiring count until they have drained)."""
        used = self.memory_used() - sum(self._estimate(e.info) for e in gone)
        within = self.memory_budget is None or used + self._estimate(info) <= self.memory_budget
        return within and self._loaded_count() - len(gone) + 1 <= self.max_loaded

    def _room_problem(self, info: ModelInfo, exclude: str) -> Overloaded | None:
        """Why ``info`` cannot load even after evicting every idle unpinned model; None if it can.
        Pure: nothing is evicted."""
        need = self._estimate(info)
        if self.memory_budget is not None and need > self.memory_budget:
            return Overloaded(
                f"model {info.id!r} needs {need >> 20} MiB, more than the whole budget of "
                f"{self.memory_budget >> 20} MiB",
                retry_after=300.0,
            )
        if self._would_fit(info, self._evictable(exclude)):
            return None
        budget = "unlimited" if self.memory_budget is None else f"{self.memory_budget >> 20} MiB"
        return Overloaded(
            f"model {info.id!r} ({need >> 20} MiB) does not fit: {self.memory_used() >> 20} MiB of "
            f"{budget} and {self._loaded_count()} of {self.max_loaded} models in use by busy, "
            "pinned or default models",
            retry_after=30.0,
        )

    def _make_room(self, info: ModelInfo, exclude: str) -> list[asyncio.Task[None]]:
        """Evict idle unpinned models (LRU) until ``info`` fits; raise :class:`Overloaded` (evicting
        nothing) if it cannot.

        Returns the drain tasks of the evicted engines: the load must wait for them, so that the
        budget holds at every moment.
        """
        problem = self._room_problem(info, exclude)
        if problem is not None:
            raise problem
        freeing: list[asyncio.Task[None]] = []
        gone: list[_Entry] = []
        for victim in self._evictable(exclude):
            if self._would_fit(info, gone):
                break
            log.info("model_evicted", model=victim.info.id, for_model=info.id)
            gone.append(victim)
        for victim in gone:
            retiring = self._unload(victim)
            if retiring is not None and retiring.task is not None:
                freeing.append(retiring.task)
        return freeing

    def _unload(self, entry: _Entry) -> _Retiring | None:
        engine, entry.engine = entry.engine, None
        self._emit("unloaded", entry.info.id)
        return self._retire(engine, entry.last_used) if engine is not None else None

    # -- serving --------------------------------------------------------------------------------

    @property
    def default_id(self) -> str | None:
        return self._default

    def models(self) -> list[ModelInfo]:
        """Models that can be requested (loaded or loadable on demand), the default first."""
        entries = sorted(self._entries.values(), key=lambda e: e.info.id != self._default)
        return [
            e.info
            for e in entries
            if not e.broken and not (e.engine is not None and e.engine.state is EngineState.FAILED)
        ]

    def engines(self) -> list[Engine]:
        """Engines currently constructed (loaded, loading or failed), not the retiring ones."""
        return [e.engine for e in self._entries.values() if e.engine is not None]

    def default_for(self, task: str) -> str | None:
        """The model a request of ``task`` that names no model goes to.

        ``chat``: the default if its task is chat, else the first served model (in the order the
        models were added: the selection's best fit first) whose task is ``chat`` and that has not
        failed, else the default (a base model then answers through its template or the fallback).
        Any other task: the default.
        """
        if task != "chat":
            return self._default
        default = self._entries.get(self._default or "")
        if default is not None and default.info.task == "chat":
            return self._default
        for entry in self._entries.values():
            failed = entry.broken or (entry.engine is not None and entry.engine.state is EngineState.FAILED)
            if entry.info.task == "chat" and not failed:
                return entry.info.id
        return self._default

    def resolve(self, model_id: str | None, task: str = "completion") -> Engine:
        """The engine for ``model_id``, else for the default of ``task`` (see :meth:`default_for`)."""
        key = model_id or self.default_for(task)
        if key is None:
            raise ModelNotReady("no model is installed; import or sync one first", retry_after=30.0)
        entry = self._entries.get(key)
        if entry is None:
            known = ", ".join(sorted(self._entries)) or "none"
            raise NotFound(f"model {key!r} is not served here (available: {known})", param="model")
        if key in self._switching:
            raise ModelNotReady(f"model {key!r} is being replaced; retry shortly", retry_after=5.0)
        engine = entry.engine
        if entry.broken or (engine is not None and engine.state is EngineState.FAILED):
            raise EngineError(f"model {key!r} failed to load: {entry.error}")
        if engine is None or (engine.state is EngineState.IDLE and entry.task is None):
            if entry.task is None:
                self._begin_load(entry)  # Overloaded (503 + Retry-After) when it cannot fit
            raise ModelNotReady(f"model {key!r} is loading", retry_after=2.0)
        entry.last_used = self._clock()
        return engine

    @property
    def loading(self) -> bool:
        return any(
            e.task is not None or (e.engine is not None and e.engine.state is EngineState.LOADING)
            for e in self._entries.values()
        )

    def pin(self, model_id: str, pinned: bool = True) -> None:
        entry = self._entries.get(model_id)
        if entry is None:
            raise NotFound(f"model {model_id!r} is not served here", param="model")
        entry.pinned = pinned

    def fit_limits(self) -> list[str]:
        """After the budget or the model count was lowered: unload idle, unpinned models that are
        not the default (least recently used first) until the loaded ones fit. Busy, pinned and
        default models stay (the limits then hold from the next load on). Returns the unloaded ids."""
        gone: list[str] = []
        # what stays once the retired engines have drained (they still count until then)
        used = sum(self._estimate(e.info) for e in self._entries.values() if e.loaded)
        count = sum(1 for e in self._entries.values() if e.loaded)
        for entry in self._evictable(exclude=""):
            if (self.memory_budget is None or used <= self.memory_budget) and count <= self.max_loaded:
                break
            log.info("model_evicted", model=entry.info.id, reason="limits lowered")
            used -= self._estimate(entry.info)
            count -= 1
            self._unload(entry)
            gone.append(entry.info.id)
        return gone

    def unload_idle(self) -> list[str]:
        """Unload models unused for ``keep_alive_s`` (never the default, a pinned or a busy one)."""
        now = self._clock()
        chat = self.default_for("chat")
        gone = [e for e in self._evictable(exclude=chat or "") if now - e.last_used >= self.keep_alive_s]
        for entry in gone:
            log.info("model_idle_unload", model=entry.info.id, idle_s=round(now - entry.last_used, 1))
            self._unload(entry)
        return [e.info.id for e in gone]

    def status(self) -> list[ModelStatus]:
        now = self._clock()
        out = []
        for entry in sorted(self._entries.values(), key=lambda e: e.info.id != self._default):
            engine = entry.engine
            if engine is None:
                state = "loading" if entry.task is not None else "failed" if entry.broken else "unloaded"
            else:
                state = "loading" if entry.task is not None else engine.state.value
            out.append(self._status_row(entry.info, state, entry, now))
        out.extend(
            self._status_row(r.engine.info, "retiring", None, now, queue=r.engine.queue_depth)
            for r in self._retiring
        )
        return out

    def _status_row(
        self, info: ModelInfo, state: str, entry: _Entry | None, now: float, queue: int | None = None
    ) -> ModelStatus:
        engine = entry.engine if entry is not None else None
        return ModelStatus(
            id=info.id,
            state=state,
            default=entry is not None and info.id == self._default,
            pinned=entry is not None and entry.pinned,
            memory_bytes=self._estimate(info) if state in ("ready", "loading", "retiring") else 0,
            size_bytes=info.size_bytes,
            queue_depth=queue if queue is not None else (engine.queue_depth if engine is not None else 0),
            idle_s=round(now - entry.last_used, 3) if entry is not None and entry.loaded else None,
            format=info.format,
            task=info.task,
            path=str(info.path),
            error=entry.error if entry is not None else None,
        )

    # -- hot swap -------------------------------------------------------------------------------

    async def swap(self, info: ModelInfo, *, pin: bool = False) -> SwapResult:
        """Make ``info`` the default model without failing in-flight requests (module docstring).

        Raises :class:`SwapFailed` (``reason``: ``over_budget``, ``load_failed``, ``smoke_failed``,
        ``refused``: crash isolation refused the model)
        and leaves the previous default serving when the new model cannot take over.
        """
        async with self._swap_lock:
            previous = self._default
            current = self._entries.get(info.id)
            if current is not None and current.info == info and self._serving(current):
                # Already loaded and serving (by id): promote it, no second copy.
                current.pinned = current.pinned or pin
                if info.id != previous:
                    self._promote(current, previous)
                return SwapResult(previous, info.id, 0.0, 0.0)
            if self._factory is None:
                raise SwapFailed("this pool has no engine factory", reason="load_failed")
            victims: list[_Entry] = []
            freeing: list[asyncio.Task[None]] = []
            problem = self._room_problem(info, exclude=info.id)
            if problem is None:
                freeing = self._make_room(info, exclude=info.id)
            else:  # decided before anything is evicted
                victims = self._cold_swap_victims(info, previous)
                if not victims:
                    raise self._failure(info, "over_budget", str(problem))
            try:
                if victims:
                    freeing = await self._clear_for(info, victims)
                engine, load_s, smoke_s = await self._load_checked(info, freeing, previous, victims)
            finally:
                self._switching.clear()
            result = SwapResult(previous, info.id, load_s, smoke_s)
            replaced = self._entries.get(info.id)
            self._entries[info.id] = _Entry(
                info, engine, pinned=pin or (replaced.pinned if replaced else False), last_used=self._clock()
            )
            self._default = info.id
            if replaced is not None and replaced.engine is not None:
                self._retire(replaced.engine, replaced.last_used)  # same id, new version: drain the old
            if previous is not None and previous != info.id:
                old = self._entries.get(previous)
                if old is not None and not old.pinned and old.engine is not None:
                    self._unload(old)
            self.swaps["ok"] += 1
            log.info("model_swapped", model=info.id, previous=previous, load_s=round(result.load_s, 3))
            self._emit("swapped", info.id)
            return result

    async def _load_checked(
        self, info: ModelInfo, freeing: list[asyncio.Task[None]], previous: str | None, victims: list[_Entry]
    ) -> tuple[Engine, float, float]:
        """Load ``info`` and smoke-test it: ``(engine, load seconds, smoke seconds)``. On failure the
        new engine is closed, what a cold swap unloaded is loaded again, and SwapFailed is raised."""
        assert self._factory is not None
        engine = self._factory(info)
        started = self._clock()
        log.info("model_swap_loading", model=info.id, previous=previous, cold=bool(victims))
        try:
            if freeing:
                await asyncio.gather(*freeing, return_exceptions=True)
            await engine.load()
        except ModelLoadError as exc:
            reason = "refused" if isinstance(exc, ModelRefused) else "load_failed"
            raise await self._abandon(engine, victims, reason, str(exc)) from exc
        loaded_at = self._clock()
        if self._smoke is not None:
            try:
                await asyncio.wait_for(self._smoke(engine), self._smoke_timeout_s)
            except (TimeoutError, EngineError, ValueError, RuntimeError) as exc:
                detail = "timed out" if isinstance(exc, TimeoutError) else str(exc)
                raise await self._abandon(engine, victims, "smoke_failed", detail) from exc
        return engine, loaded_at - started, self._clock() - loaded_at

    async def _abandon(self, engine: Engine, victims: list[_Entry], reason: str, detail: str) -> SwapFailed:
        await engine.close()
        await self._restore(victims)
        return self._failure(engine.info, reason, detail)

    def _cold_swap_victims(self, info: ModelInfo, previous: str | None) -> list[_Entry]:
        """The loaded entries a cold swap to ``info`` would unload (the unpinned default and an older
        copy of ``info``'s id), if unloading them (and evicting idle models) makes ``info`` fit;
        else nothing."""
        if not self.cold_swap:
            return []
        victims = [
            e
            for key in dict.fromkeys(k for k in (previous, info.id) if k is not None)
            if (e := self._entries.get(key)) is not None and e.loaded and e.task is None
            and (not e.pinned or key == info.id)
        ]  # fmt: skip
        if not victims:
            return []
        others = [e for e in self._evictable(info.id) if e not in victims]
        return victims if self._would_fit(info, [*victims, *others]) else []

    async def _clear_for(self, info: ModelInfo, victims: list[_Entry]) -> list[asyncio.Task[None]]:
        """Unload ``victims`` and wait until they are closed, then make room for ``info``."""
        self.swaps["cold"] += 1
        self._switching = {e.info.id for e in victims} | {info.id}
        log.warning(
            "model_cold_swap", model=info.id, unloading=sorted(self._switching - {info.id}),
            budget_mib=None if self.memory_budget is None else self.memory_budget >> 20,
        )  # fmt: skip
        draining = [r.task for e in victims if (r := self._unload(e)) is not None and r.task is not None]
        await asyncio.gather(*draining, return_exceptions=True)
        try:
            return self._make_room(info, exclude=info.id)
        except Overloaded as exc:  # something else grew meanwhile
            await self._restore(victims)
            raise self._failure(info, "over_budget", str(exc)) from None

    async def _restore(self, victims: list[_Entry]) -> None:
        """After a failed cold swap: load the unloaded models again (the default first)."""
        self._switching.clear()
        for entry in sorted(victims, key=lambda e: e.info.id != self._default):
            if entry.engine is None and not entry.broken:
                try:
                    self._begin_load(entry)
                except (Overloaded, ModelLoadError) as exc:
                    entry.error = str(exc)
                    log.error("model_restore_failed", model=entry.info.id, error=str(exc))
        await self.wait_loaded()

    @staticmethod
    def _serving(entry: _Entry) -> bool:
        return entry.task is None and entry.engine is not None and entry.engine.state is EngineState.READY

    def _promote(self, entry: _Entry, previous: str | None) -> None:
        self._default = entry.info.id
        entry.last_used = self._clock()
        old = self._entries.get(previous) if previous is not None else None
        if old is not None and not old.pinned and old.engine is not None:
            self._unload(old)
        self.swaps["ok"] += 1
        log.info("model_swapped", model=entry.info.id, previous=previous, load_s=0.0)
        self._emit("swapped", entry.info.id)

    def _failure(self, info: ModelInfo, reason: str, detail: str) -> SwapFailed:
        self.swaps[reason] += 1
        log.error("model_swap_failed", model=info.id, reason=reason, error=detail, kept=self._default)
        self._emit("swap_failed", info.id)
        return SwapFailed(
            f"swap to {info.id!r} failed ({reason}): {detail}; still serving {self._default!r}",
            reason=reason,
        )

    def _retire(self, engine: Engine, last_used: float) -> _Retiring:
        """Stop handing ``engine`` out; close it once its in-flight requests are done."""
        retiring = _Retiring(engine, last_used, self._clock())
        self._retiring.append(retiring)
        retiring.task = asyncio.get_running_loop().create_task(self._drain(retiring))
        return retiring

    async def _drain(self, retiring: _Retiring) -> None:
        engine = retiring.engine
        deadline = retiring.since + self._drain_timeout_s
        try:
            # ``settle_s`` covers requests resolved just before the swap that have not reached
            # the engine's queue yet.
            while self._clock() < deadline:
                settled = self._clock() - retiring.last_used >= self._settle_s
                if settled and engine.queue_depth == 0:
                    break
                await asyncio.sleep(0.05)
            else:
                log.warning("model_drain_timeout", model=engine.info.id, queue=engine.queue_depth)
            await engine.close()
            log.info("model_unloaded", model=engine.info.id)
        finally:
            with contextlib.suppress(ValueError):
                self._retiring.remove(retiring)

    async def wait_retired(self) -> None:
        """Wait until every retired engine has drained and closed."""
        while tasks := [r.task for r in self._retiring if r.task is not None]:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        for entry in self._entries.values():
            if entry.task is not None:
                entry.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await entry.task
        for retiring in list(self._retiring):
            if retiring.task is not None:
                retiring.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await retiring.task
            with contextlib.suppress(Exception):
                await retiring.engine.close()
        self._retiring.clear()
        for entry in self._entries.values():
            if entry.engine is not None:
                await entry.engine.close()


__all__ = [
    "EngineFactory",
    "Listener",
    "MemoryEstimate",
    "ModelPool",
    "ModelStatus",
    "SmokeTest",
    "SmokeTestFailed",
    "SwapFailed",
    "SwapResult",
    "default_memory_budget",
    "pool_options",
    "size_estimate",
    "smoke_generate",
]
