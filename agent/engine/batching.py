"""Continuous batching: one decode thread, many sequences, one llama context.

The asyncio side only *submits* jobs and *receives* chunks; the decode thread owns the context.
Each step the thread (1) takes newly submitted jobs, (2) drops cancelled and expired ones,
(3) admits waiting jobs into free slots (longest cached prefix first, within the KV budget),
(4) decodes one batch holding the next token of every generating sequence (rows in slot order),
then the step's prompt chunks, each chunk alone in its batch and cut at fixed positions
(llama.cpp's CPU numerics depend on how a sequence's tokens are grouped into a batch, so a prompt
must always be grouped the same way for its greedy output not to depend on its neighbours or on
prefix reuse), (5) samples each
sequence with its own native sampler chain right after the batch that produced its logits, and
(6) hands the step's chunks to the event loop with one ``call_soon_threadsafe`` per loop.

Invariants:

* Only the decode thread calls the backend (llama.cpp contexts are not thread-safe); other
  threads touch a job only through :meth:`BatchRunner.submit` and :meth:`BatchRunner.cancel`.
* Every submitted job receives exactly one final chunk (``finish_reason`` set, usage attached) or
  one exception, and nothing after it.
* A slot's ``cached`` list equals the tokens held in the KV cache for that sequence, position by
  position (also after a copy from another slot or a load from the disk prompt cache); the rest
  is removed with ``seq_rm``. Batch-invariant mode: a prompt reuses the longest common prefix that
  was computed in whole prompt chunks (rounded down to a chunk boundary), so a stream's greedy
  output is the same alone, batched, or after a reuse. Fast mode: every token of the common prefix
  but the last prompt token.
* A job is either generating, decoding its prompt, or following a running prompt (``follow``):
  a follower takes no prompt step until its leader's cache holds the shared prefix or the leader
  ended; then it copies what is best at that moment, so a shared prefix is decoded once.
* KV budget, when the slots share one context (``shared_kv``): the prompt + ``max_tokens`` of all
  running jobs plus the tokens cached by idle slots never exceed the context; idle caches are
  evicted (least recently used first) to make room, and a job that does not fit yet waits (FIFO)
  rather than fail. With a stream per slot, each slot simply has ``n_ctx`` cells of its own.
* Admitted + waiting jobs never exceed ``n_slots + max_queue``; beyond that ``submit`` raises
  :class:`agent.errors.Overloaded` (HTTP 429 with Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agent.engine.base import FinishReason, GenerationChunk, SamplingParams, TokenLogprob, Usage
from agent.engine.prompt_cache import PromptCache
from agent.engine.slots import (
    COPY_MIN_GAIN,
    PrefillWork,
    SlotView,
    best_source,
    choose_slot,
    pending_prefix,
    plan_step,
    worth_copying,
)
from agent.engine.textstream import TextStream
from agent.errors import ContextOverflow, EngineError, Overloaded
from fleet.log import get_logger

log = get_logger(__name__)

__all__ = ["BatchRunner", "DecodeBackend", "Job", "Sampler", "StepStats"]

DECODE_NO_SLOT = 1


class Sampler(Protocol):
    def sample(self, batch_index: int) -> int: ...

    def logprobs(self, batch_index: int, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
        """``token``'s log probability and the ``top_n`` best ``(token, logprob)``, most likely first."""
        ...

    def close(self) -> None: ...


class DecodeBackend(Protocol):
    """What the runner needs from a llama context (real: :class:`agent.engine.native.NativeContext`)."""

    n_ctx: int
    """Cells one sequence may use."""
    n_batch: int
    n_slots: int
    shared_kv: bool
    """True when the slots share ``n_ctx`` cells (then admission keeps a budget)."""

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], logits: Sequence[bool]
    ) -> int: ...

    def seq_rm(self, seq: int, p0: int) -> bool: ...

    def seq_cp(self, src: int, dst: int, n: int) -> bool:
        """Make ``dst`` hold the first ``n`` cells of ``src`` (nothing else); False on failure."""
        ...

    def seq_state(self, seq: int) -> bytes | bytearray | None:
        """The sequence's KV state (``llama_state_seq_get_data``); None if it cannot be read."""
        ...

    def set_seq_state(self, seq: int, data: bytes) -> bool:
        """Replace the sequence's KV state with ``data``; False if llama.cpp refuses it."""
        ...

    def make_sampler(self, params: SamplingParams, history: Sequence[int]) -> Sampler: ...

    def is_eog(self, token: int) -> bool: ...

    def piece(self, token: int) -> bytes: ...


Item = GenerationChunk | BaseException


@dataclass(eq=False)
class Job:
    """One generation request in flight. Fields below ``cancelled`` belong to the decode thread."""

    tokens: list[int]
    max_tokens: int
    sampling: SamplingParams
    stops: tuple[str, ...]
    deadline: float | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    stop_tokens: frozenset[int] = frozenset()
    """Token ids that end the generation like a stop string (e.g. a template's turn marker)."""
    cancelled: bool = False
    # decode-thread state
    slot: int = -1
    done: int = 0
    """Prompt tokens already in the KV cache."""
    reused: int = 0
    """Prompt tokens taken from a cache (the slot's, another slot's, disk) instead of decoded."""
    follow: Job | None = None
    """A running job whose prompt shares a longer prefix: this one waits until that job's cache
    holds ``follow_target`` tokens, then copies them (a shared prefix is computed once)."""
    follow_target: int = 0
    next_token: int | None = None
    generated: int = 0
    finished: bool = False
    sampler: Sampler | None = None
    text: TextStream | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """Log probabilities of tokens sampled but not yet sent (when ``sampling.logprobs`` is set)."""


@dataclass
class _Slot:
    index: int
    cached: list[int] = field(default_factory=list)
    job: Job | None = None
    last_used: int = 0
    canonical: int = 0
    """Leading cached tokens computed in whole prompt chunks: the only ones a new prompt reuses."""


@dataclass
class StepStats:
    """Counters for /metrics and the benchmark (read without locking: approximate)."""

    steps: int = 0
    decoded_tokens: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    copied_tokens: int = 0
    """Reused tokens whose cells were copied from another slot's cache."""
    disk_tokens: int = 0
    """Reused tokens whose cells were loaded from the disk prompt cache."""
    generated_tokens: int = 0


class BatchRunner:
    """The decode thread and its scheduler (see module docstring)."""

    def __init__(
        self,
        backend: DecodeBackend,
        *,
        max_queue: int = 16,
        prefill_chunk: int = 256,
        clock: Callable[[], float] = time.monotonic,
        name: str = "llama-decode",
        batch_invariant: bool = True,
        copy_min_gain: int = COPY_MIN_GAIN,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self._backend = backend
        self._disk = prompt_cache
        self._invariant = batch_invariant
        self._copy_min_gain = copy_min_gain
        self._max_queue = max_queue
        self._chunk = max(1, min(prefill_chunk, backend.n_batch))
        self._align = self._chunk if batch_invariant else 1
        """Reused prefixes are rounded down to this (whole chunks in batch-invariant mode)."""
        self._snapshot: list[Job] = []
        self._clock = clock
        self._slots = [_Slot(i) for i in range(backend.n_slots)]
        self._cv = threading.Condition()
        self._intake: deque[Job] = deque()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._closing = False
        self._tick = 0
        self._outbox: list[tuple[Job, Item]] = []
        self.stats = StepStats()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -- any thread ----------------------------------------------------------------------------

    @property
    def n_waiting(self) -> int:
        return len(self._intake) + len(self._waiting)

    @property
    def n_running(self) -> int:
        return len(self._active)

    @property
    def capacity(self) -> int:
        return self._backend.n_ctx

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._closing:
                raise EngineError("the engine is shutting down")
            in_flight = len(self._intake) + len(self._waiting) + len(self._active)
            if in_flight >= len(self._slots) + self._max_queue:
                raise Overloaded(
                    f"queue full: {in_flight} requests in flight "
                    f"({len(self._slots)} slots + {self._max_queue} waiting)",
                    retry_after=1.0,
                    status=429,
                )
            self._intake.append(job)
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Ask the decode thread to stop ``job``; its slot is freed at the next step."""
        job.cancelled = True
        with self._cv:
            self._cv.notify()

    def close(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- decode thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._intake and not self._closing and not self._has_work():
                    if self._disk is not None:
                        self._disk.set_busy(False)  # queued prompt-cache saves are written now
                    while not self._intake and not self._closing and not self._has_work():
                        self._cv.wait()
                    if self._disk is not None:
                        self._disk.set_busy(True)
                if self._closing:
                    break
                while self._intake:
                    self._waiting.append(self._intake.popleft())
            try:
                self._step()
            except Exception as exc:  # never let the thread die: fail what was running
                log.exception("decode_step_failed")
                for job in list(self._active):
                    self._fail(job, exc)
                self._reset_caches()
            self._flush()
        for job in [*self._active, *self._waiting, *self._intake]:
            self._fail(job, EngineError("the engine was shut down"))
        self._flush()

    def _has_work(self) -> bool:
        return bool(self._active) or bool(self._waiting)

    def _step(self) -> None:
        self._tick += 1
        self._reap()
        self._admit()
        if not self._active:
            return
        self._resolve_followers()
        self._snapshot = list(self._active)
        # rows in slot order: with a KV stream per slot llama.cpp cuts a batch into one micro-batch
        # per run of consecutive sequence ids, and each micro-batch reads all the weights again
        gen = sorted((j for j in self._active if j.next_token is not None), key=lambda j: j.slot)
        prefill = [
            PrefillWork(i, j.done, len(j.tokens))
            for i, j in enumerate(self._active)
            if j.next_token is None and j.follow is None
        ]
        plan = plan_step(len(gen), prefill, self._backend.n_batch, self._chunk)
        if gen:
            self._decode_generating(gen)
        for key, start, end in plan:
            job = self._snapshot[key]
            if not job.finished:
                self._decode_chunk(job, start, end)
        self.stats.steps += 1

    def _decode(
        self, jobs: list[Job], tokens: list[int], positions: list[int], seqs: list[int], logits: list[bool]
    ) -> bool:
        status = self._backend.decode(tokens, positions, seqs, logits)
        if status == DECODE_NO_SLOT:
            self._evict_idle(everything=True)
            status = self._backend.decode(tokens, positions, seqs, logits)
        if status == 0:
            self.stats.decoded_tokens += len(tokens)
            return True
        err = EngineError(f"llama_decode failed with status {status} (batch of {len(tokens)} tokens)")
        for job in jobs:
            slot = self._slots[job.slot]
            slot.cached.clear()
            slot.canonical = 0
            self._backend.seq_rm(job.slot, 0)
            self._fail(job, err)
        return False

    def _decode_generating(self, gen: list[Job]) -> None:
        """One batch with the next token of every generating sequence (one row each)."""
        tokens = [j.next_token for j in gen if j.next_token is not None]
        positions = [len(self._slots[j.slot].cached) for j in gen]
        if not self._decode(gen, tokens, positions, [j.slot for j in gen], [True] * len(gen)):
            return
        for index, job in enumerate(gen):
            assert job.next_token is not None
            self._slots[job.slot].cached.append(job.next_token)
            job.next_token = None
            self._sample(job, index)

    def _decode_chunk(self, job: Job, start: int, end: int) -> None:
        """One prompt chunk of one sequence, alone in its batch (see :func:`plan_step`)."""
        n = end - start
        last = end == len(job.tokens)
        logits = [False] * n
        logits[-1] = last
        chunk = job.tokens[start:end]
        if not self._decode([job], chunk, list(range(start, end)), [job.slot] * n, logits):
            return
        slot = self._slots[job.slot]
        slot.cached.extend(chunk)
        if end % self._chunk == 0:
            slot.canonical = end
        job.done = end
        self.stats.prompt_tokens += n
        if last:
            self._sample(job, n - 1)

    def _sample(self, job: Job, index: int) -> None:
        assert job.sampler is not None and job.text is not None
        token = job.sampler.sample(index)
        if token in job.stop_tokens or self._backend.is_eog(token):
            self._finish(job, "stop")
            return
        job.generated += 1
        self.stats.generated_tokens += 1
        piece = self._backend.piece(token)
        if job.sampling.logprobs is not None:
            logprob, top = job.sampler.logprobs(index, token, job.sampling.logprobs)
            alternatives = tuple((self._backend.piece(t), lp) for t, lp in top)
            job.logprobs.append(TokenLogprob(piece, logprob, alternatives))
        text, stopped = job.text.feed(piece)
        if text or job.logprobs:
            self._outbox.append((job, GenerationChunk(text=text, logprobs=self._take_logprobs(job))))
        if stopped:
            self._finish(job, "stop")
        elif job.generated >= job.max_tokens:
            self._finish(job, "length")
        else:
            job.next_token = token

    def _reap(self) -> None:
        now = self._clock()
        for job in list(self._active):
            if job.cancelled:
                self._finish(job, "cancelled")
            elif job.deadline is not None and now > job.deadline:
                self._finish(job, "length")
        if any(j.cancelled for j in self._waiting):
            for job in [j for j in self._waiting if j.cancelled]:
                self._waiting.remove(job)
                self._deliver_final(job, "cancelled")

    def _admit(self) -> None:
        capacity = self._backend.n_ctx
        while self._waiting:
            free = [s for s in self._slots if s.job is None]
            if not free:
                return
            job = self._waiting[0]
            views = [self._view(s) for s in free]
            busy = () if self._backend.shared_kv else {s.index for s in self._slots if s.job is not None}
            index, keep = choose_slot(views, job.tokens, self._align, busy)
            slot = self._slots[index]
            reserved = sum(len(j.tokens) + j.max_tokens for j in self._active)
            need = len(job.tokens) + job.max_tokens
            if need > capacity:
                self._waiting.popleft()
                self._fail(job, ContextOverflow(f"{need} tokens exceed the context of {capacity} tokens"))
                continue
            if not self._backend.shared_kv:
                self._waiting.popleft()
                self._start(job, slot, keep)
                continue
            if reserved + need > capacity:
                return  # wait for running jobs to finish
            idle = sorted((s for s in free if s is not slot), key=lambda s: s.last_used)
            idle_cached = sum(len(s.cached) for s in idle)
            for other in idle:
                if reserved + need + idle_cached <= capacity:
                    break
                idle_cached -= len(other.cached)
                self._drop_cache(other)
            self._waiting.popleft()
            self._start(job, slot, keep)

    def _view(self, slot: _Slot) -> SlotView:
        """What the pure rules see of a slot: in fast mode every cached token is reusable."""
        return SlotView(slot.index, slot.cached, slot.last_used, slot.canonical if self._invariant else None)

    def _truncate(self, slot: _Slot, keep: int) -> int:
        """Cut ``slot``'s cache to ``keep`` tokens (all of it if llama.cpp cannot); the kept length."""
        if len(slot.cached) > keep:
            if not self._backend.seq_rm(slot.index, keep):
                self._backend.seq_rm(slot.index, 0)
                keep = 0
            del slot.cached[keep:]
        slot.canonical = min(slot.canonical, keep)
        return keep

    def _copy_better_prefix(self, job: Job, slot: _Slot, keep: int) -> int:
        """If another slot (free or busy) holds a prefix of ``job``'s prompt longer than ``keep`` by
        at least ``copy_min_gain`` tokens, copy those cells into ``slot``; the reusable length."""
        source = best_source([self._view(s) for s in self._slots if s is not slot], job.tokens, self._align)
        if source is None or not worth_copying(keep, source, self._copy_min_gain):
            return keep
        src = self._slots[source.index]
        if not self._backend.seq_cp(src.index, slot.index, source.keep):
            self._backend.seq_rm(slot.index, 0)
            slot.cached.clear()
            slot.canonical = 0
            return 0
        slot.cached[:] = src.cached[: source.keep]
        slot.canonical = min(src.canonical, source.keep)
        self.stats.copied_tokens += source.keep
        return source.keep

    def _find_leader(self, job: Job, keep: int) -> None:
        """Follow a running prompt that will hold a longer shared prefix than any cache does now."""
        running = [
            (i, j.tokens, j.done)
            for i, j in enumerate(self._active)
            if j.next_token is None and j.follow is None and not j.finished
        ]
        found = pending_prefix(running, job.tokens, self._align)
        if found is not None and found[1] - keep >= max(1, self._copy_min_gain):
            job.follow = self._active[found[0]]
            job.follow_target = found[1]

    def _resolve_followers(self) -> None:
        """Followers whose leader reached the shared prefix (or stopped) copy it and go on."""
        for job in self._active:
            leader = job.follow
            if leader is None or (not leader.finished and leader.done < job.follow_target):
                continue
            job.follow = None
            slot = self._slots[job.slot]
            keep = self._copy_better_prefix(job, slot, job.done)
            self.stats.reused_tokens += keep - job.done
            job.done = job.reused = keep

    def _load_from_disk(self, job: Job, slot: _Slot, keep: int) -> int:
        """If the disk prompt cache holds a prefix of the prompt longer than ``keep`` by
        ``copy_min_gain`` tokens, load it into ``slot`` (whole: see :class:`PromptCache`); the
        reusable length."""
        if self._disk is None:
            return keep
        found = self._disk.best(job.tokens)
        if found is None or found[1] - keep < max(1, self._copy_min_gain):
            return keep
        entry, n = found
        payload = self._disk.load(entry)
        if payload is None:
            return keep
        if not self._backend.set_seq_state(slot.index, payload):
            log.warning("prompt_cache_load_failed", tokens=n)
            self._backend.seq_rm(slot.index, 0)
            slot.cached.clear()
            slot.canonical = 0
            return 0
        slot.cached[:] = entry.tokens
        slot.canonical = min(entry.canonical, n)
        self.stats.disk_tokens += n
        return n

    def _save_to_disk(self, slot: _Slot) -> None:
        """Offer ``slot``'s cells to the disk prompt cache when they are a prefix a new request
        shares with an earlier one (a system prompt seen twice) and the cache lacks it. Called
        when the slot holds exactly that prefix, before the new request's own tokens are added."""
        if self._disk is None or not self._disk.wants(slot.cached):
            return
        data = self._backend.seq_state(slot.index)
        if data:
            self._disk.offer(list(slot.cached), slot.canonical if self._invariant else len(slot.cached), data)

    def _save_prefix(self, slot: _Slot) -> None:
        try:
            self._save_to_disk(slot)
        except Exception:  # a cache is an optimisation: never fail the request for it
            log.exception("prompt_cache_save_failed")

    def _start(self, job: Job, slot: _Slot, keep: int) -> None:
        own = keep = self._truncate(slot, keep)
        keep = self._copy_better_prefix(job, slot, keep)
        # A copy across KV streams lands at the next decode: until then the slot's buffer is not
        # what its cells say, so it is neither loaded into (the copy would overwrite the load)
        # nor saved from (the state would hold stale data). Only the slot's own prefix is saved.
        if keep == own:
            keep = self._load_from_disk(job, slot, keep)
            if keep == own and keep > 0:
                self._save_prefix(slot)
        try:
            job.sampler = self._backend.make_sampler(job.sampling, job.tokens)
        except Exception as exc:
            self._fail(job, exc)
            return
        job.text = TextStream(job.stops)
        job.slot = slot.index
        job.done = keep
        job.reused = keep
        self.stats.reused_tokens += keep
        slot.job = job
        slot.last_used = self._tick
        self._find_leader(job, keep)
        self._active.append(job)

    def _reset_caches(self) -> None:
        """After an unexpected failure the caches may not match the bookkeeping: drop them all."""
        for slot in self._slots:
            with contextlib.suppress(Exception):
                self._backend.seq_rm(slot.index, 0)
            slot.cached.clear()
            slot.canonical = 0

    def _drop_cache(self, slot: _Slot) -> None:
        if slot.cached:
            self._backend.seq_rm(slot.index, 0)
            slot.cached.clear()
        slot.canonical = 0

    def _evict_idle(self, *, everything: bool) -> None:
        for slot in self._slots:
            if slot.job is None and (everything or slot.cached):
                self._drop_cache(slot)

    def _release(self, job: Job) -> None:
        if job.sampler is not None:
            job.sampler.close()
            job.sampler = None
        if job.slot >= 0:
            slot = self._slots[job.slot]
            if slot.job is job:
                slot.job = None
                slot.last_used = self._tick
        if job in self._active:
            self._active.remove(job)

    def _finish(self, job: Job, reason: FinishReason) -> None:
        tail = job.text.flush() if job.text is not None and reason != "cancelled" else ""
        self._release(job)
        self._deliver_final(job, reason, tail)

    def _deliver_final(self, job: Job, reason: FinishReason, tail: str = "") -> None:
        if job.finished:
            return
        job.finished = True
        usage = Usage(
            prompt_tokens=len(job.tokens), completion_tokens=job.generated, cached_tokens=job.reused
        )
        final = GenerationChunk(
            text=tail, finish_reason=reason, usage=usage, logprobs=self._take_logprobs(job)
        )
        self._outbox.append((job, final))

    @staticmethod
    def _take_logprobs(job: Job) -> tuple[TokenLogprob, ...]:
        taken, job.logprobs = tuple(job.logprobs), []
        return taken

    def _fail(self, job: Job, exc: BaseException) -> None:
        self._release(job)
        if job.finished:
            return
        job.finished = True
        self._outbox.append((job, exc))

    def _flush(self) -> None:
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Item]]] = {}
        for job, item in self._outbox:
            by_loop.setdefault(job.loop, []).append((job, item))
        self._outbox = []
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[Job, Item]]) -> None:
    for job, item in items:
        job.queue.put_nowait(item)
