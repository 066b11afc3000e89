"""Pure decisions of the batching scheduler: which slot a request gets, what fits, what a step holds.

No llama.cpp here: plain lists of token ids and counts, so every rule is unit-tested on data.

Invariants:

* :func:`choose_slot` picks, among free slots, the one whose cached tokens share the longest
  prefix with the new prompt, so a chat's second turn lands on the slot that holds its first
  turn; among equals, the one next to the most busy slots (with a KV stream per slot llama.cpp
  splits a batch into one micro-batch per run of consecutive sequence ids, and every
  micro-batch reads all the weights again), then the least recently used.
* :func:`reusable_prefix` always leaves at least one prompt token to decode, because the first
  sampled token needs fresh logits.
* :func:`best_source` looks at every slot, busy ones included, for the longest reusable prefix a
  prompt could *copy* (llama.cpp's ``seq_cp``) into the slot it gets; :func:`worth_copying` says
  whether that gain pays for the copy (``COPY_MIN_GAIN`` tokens). :func:`pending_prefix` finds a
  running prompt that is still being decoded and will hold a longer common prefix, so a request
  sharing it waits for those cells instead of computing them a second time.
* :func:`plan_step` cuts prompts into chunks at fixed positions (multiples of ``prefill_chunk``),
  so a prompt is split the same way alone, next to other requests, or after a prefix reuse
  (which :func:`reusable_prefix` rounds down to a chunk boundary); while any sequence is
  generating at most ``prefill_chunk`` prompt tokens are taken per step, so running streams never
  stall behind a long prompt.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

__all__ = [
    "COPY_MIN_GAIN",
    "PrefillWork",
    "Source",
    "SlotView",
    "best_source",
    "choose_slot",
    "chunk_end",
    "common_prefix",
    "pending_prefix",
    "plan_step",
    "reusable_prefix",
    "worth_copying",
]

COPY_MIN_GAIN = 64
"""Fewest extra prompt tokens a KV copy from another slot (or a load from disk) must save to be
made. A copy across KV streams moves the whole stream: for an 8 x 4,096-cell Gemma 3 270M context
it cost ~450 ms on a loaded 2-core machine where a prompt token cost ~13 ms (about 35 tokens)."""


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable_prefix(
    cached: Sequence[int], prompt: Sequence[int], canonical: int | None = None, align: int = 1
) -> int:
    """How many cached tokens a prompt can keep.

    The common prefix, minus one if it is all of the prompt, limited to the ``canonical`` part of
    the cache (tokens computed in whole prompt chunks) and rounded down to a multiple of
    ``align`` (the chunk size), so that the tokens left to decode are cut into exactly the chunks a
    fresh run would use.
    """
    keep = min(common_prefix(cached, prompt), max(0, len(prompt) - 1))
    if canonical is not None:
        keep = min(keep, canonical)
    return keep - keep % max(1, align)


@dataclass(frozen=True, slots=True)
class SlotView:
    index: int
    cached: Sequence[int]
    last_used: int
    canonical: int | None = None
    """Leading cached tokens that were computed in whole prompt chunks (None: all of them)."""


def choose_slot(
    free: Sequence[SlotView], prompt: Sequence[int], align: int = 1, busy: Collection[int] = ()
) -> tuple[int, int]:
    """``(slot index, reusable prefix length)`` of the best free slot; ``free`` must not be empty.

    Order: longest reusable prefix, then most neighbours among the ``busy`` slot indices (so the
    busy slots stay in as few runs of consecutive indices as possible), then least recently used.
    """
    if not free:
        raise ValueError("no free slot")

    def reuse(s: SlotView) -> int:
        return reusable_prefix(s.cached, prompt, s.canonical, align)

    def neighbours(s: SlotView) -> int:
        return (s.index - 1 in busy) + (s.index + 1 in busy)

    best = max(free, key=lambda s: (reuse(s), neighbours(s), -s.last_used))
    return best.index, reuse(best)


@dataclass(frozen=True, slots=True)
class Source:
    """Where a prompt's longest reusable prefix sits: slot ``index`` holds ``keep`` of its tokens."""

    index: int
    keep: int


def best_source(slots: Sequence[SlotView], prompt: Sequence[int], align: int = 1) -> Source | None:
    """The slot (free or busy) whose cache holds the longest reusable prefix of ``prompt``;
    ``None`` when no slot shares a token. Among equals, the lowest index (deterministic)."""
    best: Source | None = None
    for s in slots:
        keep = reusable_prefix(s.cached, prompt, s.canonical, align)
        if keep > 0 and (best is None or keep > best.keep):
            best = Source(s.index, keep)
    return best


def worth_copying(own: int, source: Source | None, min_gain: int = COPY_MIN_GAIN) -> bool:
    """Whether copying ``source`` beats the ``own`` reusable prefix of the chosen slot by at
    least ``min_gain`` tokens."""
    return source is not None and source.keep - own >= max(1, min_gain)


def pending_prefix(
    running: Sequence[tuple[int, Sequence[int], int]], prompt: Sequence[int], align: int = 1
) -> tuple[int, int] | None:
    """``(key, target)`` of the running prompt, given as ``(key, tokens, done)``, that shares the
    longest reusable prefix with ``prompt`` *beyond* what it has decoded so far (``done``): once
    its cache reaches ``target`` tokens, ``prompt`` can copy them instead of decoding them again.
    ``None`` when no running prompt is ahead of what is already in a cache."""
    best: tuple[int, int] | None = None
    for key, tokens, done in running:
        target = min(common_prefix(tokens, prompt), max(0, len(prompt) - 1))
        target -= target % max(1, align)
        if target > done and (best is None or target > best[1]):
            best = (key, target)
    return best


@dataclass(frozen=True, slots=True)
class PrefillWork:
    """A sequence with prompt tokens left: ``done`` of ``total`` are in the cache."""

    key: int
    done: int
    total: int


def chunk_end(done: int, total: int, chunk: int) -> int:
    """End of the prompt chunk that starts at ``done``: the next multiple of ``chunk``, or ``total``."""
    return min(total, (done // chunk + 1) * chunk)


def plan_step(
    n_generating: int, prefill: Sequence[PrefillWork], n_batch: int, prefill_chunk: int
) -> list[tuple[int, int, int]]:
    """Prompt chunks to decode this step, as ``(key, start, end)`` in ``prefill`` order.

    Chunks are cut at multiples of ``prefill_chunk`` counted from position 0, whatever else runs,
    so a prompt is always split the same way (llama.cpp's numerics depend on how tokens are
    grouped into batches). At most ``prefill_chunk`` prompt tokens are taken while sequences are
    generating, at most ``n_batch - n_generating`` otherwise, and only whole chunks.
    """
    chunk = max(1, min(prefill_chunk, n_batch))
    budget = n_batch - n_generating
    if n_generating:
        budget = min(budget, chunk)
    out: list[tuple[int, int, int]] = []
    for work in prefill:
        start = work.done
        while start < work.total:
            end = chunk_end(start, work.total, chunk)
            if end - start > budget:
                return out
            out.append((work.key, start, end))
            budget -= end - start
            start = end
    return out
