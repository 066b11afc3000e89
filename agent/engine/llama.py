"""llama.cpp backend through llama-cpp-python.

One model, one worker thread that owns the ``Llama`` object (llama.cpp contexts are not
thread-safe). Requests wait in a bounded FIFO; a full queue is refused with 429 and Retry-After.
Tokens cross from the worker thread to the event loop through ``call_soon_threadsafe``. A consumer
that stops iterating sets the cancel flag; the worker stops at the next token and frees the slot.

Invariant: at most one generation runs at a time in this engine, and the worker never touches
the event loop's objects except through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agent.engine.base import (
    CompletionRequest,
    EngineState,
    FinishReason,
    GenerationChunk,
    ModelInfo,
    Usage,
)
from agent.errors import ContextOverflow, EngineError, ModelLoadError, ModelNotReady, Overloaded

_END = object()


def _default_factory(info: ModelInfo, n_ctx: int, n_threads: int, n_batch: int) -> Any:
    import llama_cpp  # heavy import, only here

    return llama_cpp.Llama(
        model_path=str(info.path),
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        n_batch=n_batch,
        verbose=False,
    )


class LlamaEngine:
    """A GGUF model served by llama-cpp-python (see module docstring for the invariants)."""

    def __init__(
        self,
        info: ModelInfo,
        *,
        n_ctx: int = 4096,
        n_threads: int = 2,
        n_batch: int = 512,
        max_queue: int = 16,
        factory: Callable[[ModelInfo, int, int, int], Any] = _default_factory,
    ) -> None:
        self._info = info
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._n_batch = n_batch
        self._max_queue = max_queue
        self._factory = factory
        self._llama: Any = None
        self._state = EngineState.IDLE
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._lock = asyncio.Lock()
        self._waiting = 0
        self._running = 0
        self.load_error: str | None = None

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def queue_depth(self) -> int:
        return self._waiting + self._running

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    async def load(self) -> None:
        self._state = EngineState.LOADING
        loop = asyncio.get_running_loop()
        try:
            self._llama = await loop.run_in_executor(
                self._executor, self._factory, self._info, self._n_ctx, self._n_threads, self._n_batch
            )
        except Exception as exc:  # llama_cpp raises ValueError/RuntimeError on bad files
            self._state = EngineState.FAILED
            self.load_error = f"{type(exc).__name__}: {exc}"
            raise ModelLoadError(f"cannot load {self._info.path}: {exc}") from exc
        self._state = EngineState.READY

    def count_tokens(self, text: str) -> int:
        if self._llama is None:
            raise ModelNotReady("model is loading")
        return len(self._llama.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def _check_ready(self) -> None:
        if self._state is EngineState.LOADING or self._state is EngineState.IDLE:
            raise ModelNotReady(f"model {self._info.id} is loading", retry_after=2.0)
        if self._state is EngineState.FAILED:
            raise EngineError(f"model {self._info.id} failed to load: {self.load_error}")

    async def generate(self, request: CompletionRequest) -> AsyncIterator[GenerationChunk]:
        self._check_ready()
        n_prompt = self.count_tokens(request.prompt)
        if n_prompt + request.max_tokens > self._n_ctx:
            raise ContextOverflow(
                f"prompt has {n_prompt} tokens and max_tokens is {request.max_tokens}: "
                f"{n_prompt + request.max_tokens} exceeds the context of {self._n_ctx} tokens",
                param="max_tokens",
            )
        if self._waiting >= self._max_queue:
            raise Overloaded(
                f"queue full ({self._waiting} waiting, limit {self._max_queue})", retry_after=1.0, status=429
            )
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        self._running += 1
        try:
            async for chunk in self._run(request, n_prompt):
                yield chunk
        finally:
            self._running -= 1
            self._lock.release()

    async def _run(self, request: CompletionRequest, n_prompt: int) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            s = request.sampling
            finish: FinishReason = "length"
            pieces: list[str] = []
            try:
                stream = self._llama.create_completion(
                    prompt=request.prompt,
                    max_tokens=request.max_tokens,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    top_k=s.top_k,
                    min_p=s.min_p,
                    repeat_penalty=s.repeat_penalty,
                    frequency_penalty=s.frequency_penalty,
                    presence_penalty=s.presence_penalty,
                    seed=s.seed,
                    stop=list(request.stop) or None,
                    logit_bias=dict(s.logit_bias) or None,
                    stream=True,
                )
                for part in stream:
                    choice = part["choices"][0]
                    text = choice.get("text") or ""
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                    if text:
                        pieces.append(text)
                        put(GenerationChunk(text=text))
                    if cancel.is_set():
                        finish = "cancelled"
                        break
                    if request.deadline is not None and time.monotonic() > request.deadline:
                        finish = "length"
                        break
                    if choice.get("finish_reason"):
                        break
                stream.close()
                generated = "".join(pieces).encode("utf-8")
                produced = (
                    len(self._llama.tokenize(generated, add_bos=False, special=False)) if generated else 0
                )
            except Exception as exc:  # translated for the consumer below
                put(exc)
                return
            put(GenerationChunk(text="", finish_reason=finish, usage=Usage(n_prompt, produced)))

        future = loop.run_in_executor(self._executor, work)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise EngineError(f"generation failed: {item}") from item
                yield item
                if item.finish_reason is not None:
                    break
        finally:
            cancel.set()
            await asyncio.shield(future)

    async def close(self) -> None:
        llama, self._llama = self._llama, None
        if llama is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, llama.close)
        self._executor.shutdown(wait=True)
        self._state = EngineState.IDLE


__all__ = ["LlamaEngine"]
