"""Sharing the cores between the models' native compute: generation steps and embedding batches.

On a small box every engine wants every core: the llama decode thread of each generative model
(``n_threads`` threads in one llama.cpp/OpenMP team) and each embedding engine (onnxruntime's
intra-op pool, or a llama embedding context's team). Run side by side they oversubscribe the
cores, and the threads of one computation, which wait for each other at every operator's barrier,
stall whenever one of them is descheduled: a computation of 2 threads on a busy box was measured
15-30x slower than of 1 thread (docs/benchmarks.md, *Load: short requests*), and embeddings waited
behind generation for tens of seconds.

:class:`CoreShare` coordinates them; every engine of the process shares one (``engine.cpu_sharing``):

* ``split`` (default): while an embedding batch computes, generation steps run with
  :func:`generation_threads` (``n_threads - embed_threads``, at least 1) instead of ``n_threads``,
  and embeddings compute with ``embed_threads`` (default 1): the two never ask for more threads
  than ``n_threads`` together, and a one-thread computation has no barrier to stall on. Neither
  waits for the other.
* ``turns``: the native calls take turns, one at a time with all threads; when both kinds wait
  they alternate (:func:`next_turn`: short work first, then generation, then short work...), FIFO
  within a kind.
* ``off``: side by side with no coordination (the behaviour before issue 17).

An engine wraps each native call (one llama batch decode, one embedding batch, one onnxruntime
run) in :meth:`CoreShare.turn` with its kind, ``generate`` or ``embed``; a generation backend asks
:meth:`CoreShare.generation_threads` before each step.

Invariants: in ``turns`` mode at most one call holds a turn and every waiter is granted eventually
(alternation bounds its wait to one turn of the other kind per turn of its own); in ``split`` mode
``turn`` never blocks and ``embedding_active`` counts the embed calls in progress; in every mode a
turn is released even when its call raises. Turns are not re-entrant.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "KINDS",
    "MODES",
    "CoreShare",
    "Mode",
    "TurnKind",
    "TurnStats",
    "apply_thread_wait",
    "generation_threads",
    "next_turn",
]

TurnKind = Literal["generate", "embed"]
KINDS: tuple[TurnKind, ...] = ("embed", "generate")
"""In order of precedence when no turn was taken yet: short work first."""
Mode = Literal["split", "turns", "off"]
MODES: tuple[Mode, ...] = ("split", "turns", "off")


def next_turn(waiting: Mapping[TurnKind, int], last: TurnKind | None) -> TurnKind | None:
    """``turns`` mode: the kind whose oldest waiter takes the next turn, given how many wait of
    each kind and the kind of the previous turn: ``None`` when nobody waits; the only waiting kind;
    else the first waiting kind after ``last`` in :data:`KINDS`, cyclically (alternation)."""
    present: Sequence[TurnKind] = [k for k in KINDS if waiting.get(k, 0) > 0]
    if not present:
        return None
    if len(present) == 1 or last is None or last not in KINDS:
        return present[0]
    start = KINDS.index(last) + 1
    for offset in range(len(KINDS)):
        kind = KINDS[(start + offset) % len(KINDS)]
        if kind in present:
            return kind
    return present[0]  # pragma: no cover - unreachable: present is not empty


def apply_thread_wait(wait: Literal["spin", "passive"], environ: MutableMapping[str, str]) -> str | None:
    """Set ``OMP_WAIT_POLICY`` for ``wait`` (``passive``: PASSIVE; ``spin``: libgomp's default, left
    unset) unless the environment already has one; libgomp reads it once, when llama.cpp's library
    is loaded, so this must run before the first model loads. Returns the policy in effect."""
    if "OMP_WAIT_POLICY" not in environ and wait == "passive":
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return environ.get("OMP_WAIT_POLICY")


def generation_threads(mode: Mode, n_threads: int, embed_threads: int, embedding_active: bool) -> int:
    """Threads of the next generation step: ``n_threads``, except in ``split`` mode while an
    embedding computes: what ``embed_threads`` leaves of ``n_threads``, at least one."""
    if mode != "split" or not embedding_active:
        return n_threads
    return max(1, n_threads - embed_threads)


@dataclass
class TurnStats:
    """Counters since start, per kind: turns taken, seconds waited for them, seconds held."""

    turns: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    waited_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))
    held_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 0.0))


class CoreShare:
    """The process's coordination of native compute (see the module docstring)."""

    def __init__(self, mode: Mode = "split", *, embed_threads: int = 1) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown cpu_sharing mode {mode!r} (expected one of {', '.join(MODES)})")
        self.mode: Mode = mode
        self.embed_threads = embed_threads
        self._cv = threading.Condition()
        self._held = False
        self._last: TurnKind | None = None
        self._queues: dict[TurnKind, deque[int]] = {k: deque() for k in KINDS}
        self._tickets = itertools.count()
        self._embedding = 0
        self.stats = TurnStats()

    @property
    def embedding_active(self) -> bool:
        return self._embedding > 0

    def generation_threads(self, n_threads: int) -> int:
        """Threads for the next generation step of a context created with ``n_threads``."""
        return generation_threads(self.mode, n_threads, self.embed_threads, self.embedding_active)

    def _waiting(self) -> dict[TurnKind, int]:
        return {k: len(q) for k, q in self._queues.items()}

    @contextmanager
    def turn(self, kind: TurnKind) -> Iterator[None]:
        """One native call of ``kind`` (in ``turns`` mode: waits for the turn first)."""
        if kind not in self._queues:
            raise ValueError(f"unknown turn kind {kind!r} (expected one of {', '.join(KINDS)})")
        if self.mode == "off":
            yield
            return
        asked = time.perf_counter()
        with self._cv:
            if self.mode == "turns":
                ticket = next(self._tickets)
                queue = self._queues[kind]
                queue.append(ticket)
                while self._held or queue[0] != ticket or next_turn(self._waiting(), self._last) != kind:
                    self._cv.wait()
                queue.popleft()
                self._held = True
                self._last = kind
            if kind == "embed":
                self._embedding += 1
        got = time.perf_counter()
        try:
            yield
        finally:
            done = time.perf_counter()
            with self._cv:
                self._held = False
                if kind == "embed":
                    self._embedding -= 1
                self.stats.turns[kind] += 1
                self.stats.waited_s[kind] += got - asked
                self.stats.held_s[kind] += done - got
                self._cv.notify_all()
