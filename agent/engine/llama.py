"""llama.cpp backend on llama-cpp-python's low-level API, with continuous batching.

One loaded model, one llama context with ``n_parallel`` sequence slots sharing a unified KV cache,
one decode thread (:class:`agent.engine.batching.BatchRunner`) that owns the context. The asyncio
side tokenizes, checks the request against the context, submits a job and then only receives
chunks. Chat renders the messages with the model's template (:mod:`agent.engine.chat`) and runs
the same path. Embeddings use a second context on the same model (:mod:`agent.engine.llama_embed`)
on its own thread.

Invariants: refusals (context overflow 400, queue full 429, model loading 503) are raised before
the first chunk; a consumer that stops iterating cancels its job, and the decode thread frees the
slot at its next step; ``close`` stops the decode thread before freeing any C object.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.engine.base import (
    ChatRequest,
    CompletionRequest,
    Embeddings,
    EngineState,
    GenerationChunk,
    ModelInfo,
    SamplingParams,
)
from agent.engine.batching import BatchRunner, Job
from agent.engine.chat import ChatTemplate, TemplateSource, pick_template, render_chat
from agent.engine.core_share import CoreShare
from agent.engine.embed_queue import EmbedQueue
from agent.engine.lifecycle import EngineLifecycle, LoadGuard
from agent.engine.prompt_cache import PromptCache, cache_key
from agent.errors import (
    AgentError,
    BadRequest,
    ContextOverflow,
    EngineError,
    ModelLoadError,
    ModelNotReady,
)
from fleet.log import get_logger

log = get_logger(__name__)

__all__ = ["LlamaEngine"]


class LlamaEngine(EngineLifecycle):
    """A GGUF model served by llama.cpp (see the module docstring for the invariants)."""

    def __init__(
        self,
        info: ModelInfo,
        *,
        n_ctx: int = 4096,
        n_threads: int = 2,
        n_batch: int = 512,
        max_queue: int = 16,
        n_parallel: int = 4,
        prefill_chunk: int = 256,
        embed_batch: int = 512,
        batch_invariant: bool = True,
        kv_unified: bool = False,
        kv_cache_type_k: str = "f16",
        kv_cache_type_v: str = "f16",
        embed_threads: int | None = None,
        embed_max_queue: int = 8,
        embed_max_wait_s: float = 1.0,
        share: CoreShare | None = None,
        guard: LoadGuard | None = None,
        prompt_cache_dir: Path | None = None,
        prompt_cache_max_mb: int = 1024,
        prompt_cache_min_tokens: int = 512,
    ) -> None:
        super().__init__(info, guard)
        self._embed_threads = embed_threads or n_threads
        self._embed_queue = EmbedQueue(info.id, embed_max_queue, embed_max_wait_s)
        self._share = share or CoreShare("off")
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._n_batch = n_batch
        self._max_queue = max_queue
        self._n_parallel = n_parallel
        self._prefill_chunk = prefill_chunk
        self._embed_batch = embed_batch
        self._batch_invariant = batch_invariant
        self._kv_unified = kv_unified
        self._kv_types = (kv_cache_type_k, kv_cache_type_v)
        self._prompt_cache_dir = prompt_cache_dir
        self._prompt_cache_max_mb = prompt_cache_max_mb
        self._prompt_cache_min_tokens = prompt_cache_min_tokens
        self._prompt_cache: PromptCache | None = None
        self._model: Any = None
        self._ctx: Any = None
        self._runner: BatchRunner | None = None
        self._template: ChatTemplate | None = None
        self._embedder: Any = None
        self._embed_lock = asyncio.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-load")
        self._embed_pool: ThreadPoolExecutor | None = None

    # -- Engine protocol: state ----------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        runner = self._runner
        return 0 if runner is None else runner.n_waiting + runner.n_running

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def runner(self) -> BatchRunner | None:
        """The decode thread's scheduler (stats for metrics and benchmarks)."""
        return self._runner

    @property
    def chat_template(self) -> ChatTemplate | None:
        return self._template

    async def load(self) -> None:
        await self._load_with(self._loader, self._load_blocking)

    def _load_blocking(self) -> None:
        from agent.engine.native import NativeContext, NativeModel

        if not self._info.path.is_file():
            raise ModelLoadError(f"model file {self._info.path} does not exist")
        # llama.cpp's repacked CPU kernels compute a batch with other rounding than one token, so
        # a stream's greedy output would depend on its neighbours; plain kernels keep it invariant.
        model = NativeModel(self._info.path, repack=not self._batch_invariant)
        try:
            ctx = NativeContext(
                model,
                n_ctx=self._n_ctx if self._kv_unified else self._n_ctx * self._n_parallel,
                n_batch=self._n_batch,
                n_slots=self._n_parallel,
                n_threads=self._n_threads,
                unified=self._kv_unified,
                type_k=self._kv_types[0],
                type_v=self._kv_types[1],
            )
        except Exception:
            model.close()
            raise
        self._template = pick_template(
            TemplateSource(
                manifest=self._info.chat_template,
                gguf=model.chat_template(),
                architecture=model.meta("general.architecture") or "",
                bos_token=model.token_text(model.bos_id) if model.bos_id >= 0 else "",
                eos_token=model.token_text(model.eos_id) if model.eos_id >= 0 else "",
            )
        )
        self._model, self._ctx = model, ctx
        self._prompt_cache = self._open_prompt_cache(ctx)
        backend: Any = ctx if self._share.mode == "off" else _SharingCores(ctx, self._share, self._n_threads)
        self._runner = BatchRunner(
            backend,
            max_queue=self._max_queue,
            prefill_chunk=self._prefill_chunk,
            name=f"decode-{self._info.id}",
            batch_invariant=self._batch_invariant,
            prompt_cache=self._prompt_cache,
        )

    def prompt_cache_fields(self, ctx: Any) -> dict[str, Any]:
        """What makes KV cells computed by another process valid here (the disk cache's key)."""
        from agent.engine.isolation import current_build, file_sha256

        return {
            "model_sha256": file_sha256(self._info.path),
            "n_ctx_seq": ctx.n_ctx,
            "kv_unified": self._kv_unified,
            "kv_types": f"{getattr(ctx, 'type_k', 'f16')}/{getattr(ctx, 'type_v', 'f16')}",
            "batch_invariant": self._batch_invariant,
            "flash_attn": ctx.flash_attn,
            "prefill_chunk": self._prefill_chunk,
            "n_batch": self._n_batch,
            "build": current_build(),
        }

    def _open_prompt_cache(self, ctx: Any) -> PromptCache | None:
        if self._prompt_cache_dir is None:
            return None
        started = time.monotonic()
        cache = PromptCache(
            self._prompt_cache_dir,
            cache_key(self.prompt_cache_fields(ctx)),
            max_bytes=self._prompt_cache_max_mb << 20,
            min_tokens=self._prompt_cache_min_tokens,
        )
        log.info(
            "prompt_cache_opened",
            model=self._info.id,
            entries=cache.entries,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return cache

    def _check_ready(self) -> Any:
        if self._state is EngineState.FAILED:
            raise EngineError(f"model {self._info.id} failed to load: {self.load_error}")
        if self._state is not EngineState.READY or self._model is None:
            raise ModelNotReady(f"model {self._info.id} is loading", retry_after=2.0)
        return self._model

    def count_tokens(self, text: str) -> int:
        model = self._check_ready()
        return len(model.tokenize(text, add_bos=model.add_bos))

    def detokenize(self, tokens: Sequence[int]) -> tuple[str, list[bytes]]:
        """The text of ``tokens`` (control tokens as their text) and each token's bytes;
        :class:`BadRequest` naming ``tokens`` for an id beyond the vocabulary."""
        model = self._check_ready()
        bad = [t for t in tokens if not 0 <= t < model.n_vocab]
        if bad:
            raise BadRequest(
                f"tokens: id {bad[0]} is not in the vocabulary of {self._info.id} "
                f"(ids 0 to {model.n_vocab - 1})",
                param="tokens",
            )
        pieces = [model.piece(t, special=True) for t in tokens]
        return b"".join(pieces).decode("utf-8", "replace"), pieces

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Token ids of ``text`` (special tokens parsed), e.g. to build a ``logit_bias``."""
        model = self._check_ready()
        tokens: list[int] = model.tokenize(text, add_bos=add_bos)
        return tokens

    # -- generation ----------------------------------------------------------------------------

    def generate(self, request: CompletionRequest) -> AsyncIterator[GenerationChunk]:
        return self._generate(request)

    async def _generate(self, request: CompletionRequest) -> AsyncIterator[GenerationChunk]:
        model = self._check_ready()
        tokens = model.tokenize(request.prompt, add_bos=model.add_bos)
        async for chunk in self._stream(
            tokens, request.max_tokens, request.sampling, request.stop, request.deadline
        ):
            yield chunk

    def chat(self, request: ChatRequest) -> AsyncIterator[GenerationChunk]:
        return self._chat(request)

    async def _chat(self, request: ChatRequest) -> AsyncIterator[GenerationChunk]:
        model = self._check_ready()
        template = self._template
        assert template is not None
        prompt = await asyncio.to_thread(render_chat, template, request.messages)  # bounded, off the loop
        has_bos = bool(template.bos_token) and prompt.startswith(template.bos_token)
        tokens = model.tokenize(prompt, add_bos=model.add_bos and not has_bos)
        stops = tuple(dict.fromkeys((*request.stop, *template.stops)))
        async for chunk in self._stream(
            tokens,
            request.max_tokens,
            request.sampling,
            stops,
            request.deadline,
            self._stop_tokens(model, template.stops),
        ):
            yield chunk

    def _stop_tokens(self, model: Any, stops: tuple[str, ...]) -> frozenset[int]:
        """Template turn markers that are single control tokens: those render as no text, so they
        must stop the generation by id (a base model may write ``<start_of_turn>`` itself)."""
        ids: set[int] = set()
        for stop in stops:
            toks = model.tokenize(stop, add_bos=False)
            if len(toks) == 1:
                ids.add(toks[0])
        return frozenset(ids)

    def render_prompt(self, request: ChatRequest) -> str:
        """The prompt a chat request becomes (for tests and debugging)."""
        self._check_ready()
        assert self._template is not None
        return render_chat(self._template, request.messages)

    async def _stream(
        self,
        tokens: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stops: tuple[str, ...],
        deadline: float | None,
        stop_tokens: frozenset[int] = frozenset(),
    ) -> AsyncIterator[GenerationChunk]:
        if not tokens:
            raise BadRequest("prompt is empty", param="prompt")
        n_vocab = self._model.n_vocab if self._model is not None else None
        unknown = sorted(t for t in sampling.logit_bias if n_vocab is not None and not 0 <= t < n_vocab)
        if unknown:
            raise BadRequest(
                f"logit_bias: token id {unknown[0]} is not in the vocabulary of {self._info.id} "
                f"(ids 0 to {n_vocab - 1 if n_vocab else 0})",
                param="logit_bias",
            )
        if sampling.grammar is not None and self._model is not None:
            self._model.check_grammar(sampling.grammar)  # a 400 before the stream starts
        if len(tokens) + max_tokens > self._n_ctx:
            raise ContextOverflow(
                f"prompt has {len(tokens)} tokens and max_tokens is {max_tokens}: "
                f"{len(tokens) + max_tokens} exceeds the context of {self._n_ctx} tokens",
                param="max_tokens",
            )
        runner = self._runner
        if runner is None:
            raise ModelNotReady(f"model {self._info.id} is not loaded", retry_after=2.0)
        job = Job(
            tokens=tokens,
            max_tokens=max_tokens,
            sampling=sampling,
            stops=stops,
            deadline=deadline,
            loop=asyncio.get_running_loop(),
            stop_tokens=stop_tokens,
        )
        started = time.monotonic()
        first: float | None = None
        runner.submit(job)
        done = False
        try:
            while True:
                item = await job.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    if isinstance(item, AgentError):
                        raise item
                    raise EngineError(f"generation failed: {item}") from item
                if first is None:
                    first = time.monotonic()
                if item.finish_reason is not None:
                    done = True
                    self._log_done(job, item, started, first)
                yield item
                if done:
                    return
        finally:
            if not done:
                runner.cancel(job)
                log.info("generation_cancelled", model=self._info.id, prompt_tokens=len(tokens))

    def _log_done(self, job: Job, final: GenerationChunk, started: float, first: float) -> None:
        usage = final.usage
        log.info(
            "generation",
            model=self._info.id,
            finish_reason=final.finish_reason,
            prompt_tokens=len(job.tokens),
            reused_tokens=job.reused,
            completion_tokens=usage.completion_tokens if usage else 0,
            first_chunk_ms=round((first - started) * 1000, 1),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )

    # -- embeddings ----------------------------------------------------------------------------

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        model = self._check_ready()
        if not texts:
            raise BadRequest("input: at least one text is required", param="input")
        loop = asyncio.get_running_loop()
        with self._embed_queue.admit(len(texts)):
            return await self._embed_admitted(loop, model, texts)

    async def _embed_admitted(
        self, loop: asyncio.AbstractEventLoop, model: Any, texts: Sequence[str]
    ) -> Embeddings:
        async with self._embed_lock:
            if self._embed_pool is None:
                self._embed_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama-embed")
            pool = self._embed_pool

            def run() -> tuple[list[list[float]], int]:
                if self._embedder is None:
                    from agent.engine.llama_embed import LlamaEmbedder

                    self._embedder = LlamaEmbedder(
                        model, n_batch=self._embed_batch, n_threads=self._embed_threads, share=self._share
                    )
                started = time.perf_counter()
                result: tuple[list[list[float]], int] = self._embedder.embed(list(texts))
                self._embed_queue.record(len(texts), time.perf_counter() - started)
                return result

            vectors, n_tokens = await loop.run_in_executor(pool, run)
        return Embeddings(vectors=vectors, prompt_tokens=n_tokens)

    # -- lifecycle -----------------------------------------------------------------------------

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        runner, self._runner = self._runner, None
        if runner is not None:
            await loop.run_in_executor(None, runner.close)
        if self._prompt_cache is not None:
            await loop.run_in_executor(None, self._prompt_cache.close)
            self._prompt_cache = None
        if self._embed_pool is not None:
            self._embed_pool.shutdown(wait=True)
            self._embed_pool = None
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._model is not None:
            self._model.close()
            self._model = None
        self._loader.shutdown(wait=True)
        self._state = EngineState.IDLE


class _SharingCores:
    """The decode backend with every ``decode`` in a ``generate`` turn of the process's
    :class:`CoreShare`, run with the threads it leaves generation; everything else is the context's."""

    def __init__(self, ctx: Any, share: CoreShare, n_threads: int) -> None:
        self._ctx = ctx
        self._share = share
        self._n_threads = n_threads
        self._threads = n_threads

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], logits: Sequence[bool]
    ) -> int:
        with self._share.turn("generate"):
            threads = self._share.generation_threads(self._n_threads)
            if threads != self._threads:
                self._ctx.set_threads(threads)
                self._threads = threads
            status: int = self._ctx.decode(tokens, positions, seqs, logits)
        return status

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)
