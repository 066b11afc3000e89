"""Pure decisions of the batching scheduler: which slot a request gets, what fits, what a step holds.

No llama.cpp here: plain lists of token ids and counts, so every rule is unit-tested on data.

Invariants:

* :func:`choose_slot` picks, among free slots, the one whose cached tokens share the longest
  prefix with the new prompt (ties: the least recently used), so a chat's second turn lands on
  the slot that holds its first turn.
* :func:`reusable_prefix` always leaves at least one prompt token to decode, because the first
  sampled token needs fresh logits.
* :func:`plan_step` puts every generating sequence's next token in the batch first (running streams
  never stall), then fills what is left with prompt chunks, at most ``prefill_chunk`` prompt
  tokens while any sequence is generating, and never more than ``n_batch`` tokens in total.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PrefillWork",
    "SlotView",
    "choose_slot",
    "common_prefix",
    "plan_step",
    "reusable_prefix",
]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reusable_prefix(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """How many cached tokens a prompt can keep: the common prefix, minus one if it is all of it."""
    return min(common_prefix(cached, prompt), max(0, len(prompt) - 1))


@dataclass(frozen=True, slots=True)
class SlotView:
    index: int
    cached: Sequence[int]
    last_used: int


def choose_slot(free: Sequence[SlotView], prompt: Sequence[int]) -> tuple[int, int]:
    """``(slot index, reusable prefix length)`` of the best free slot; ``free`` must not be empty."""
    if not free:
        raise ValueError("no free slot")
    best = max(free, key=lambda s: (reusable_prefix(s.cached, prompt), -s.last_used))
    return best.index, reusable_prefix(best.cached, prompt)


@dataclass(frozen=True, slots=True)
class PrefillWork:
    """A sequence that still has prompt tokens to process: ``remaining`` of them."""

    key: int
    remaining: int


def plan_step(
    n_generating: int, prefill: Sequence[PrefillWork], n_batch: int, prefill_chunk: int
) -> list[tuple[int, int]]:
    """Prompt tokens to take this step, as ``(key, count)`` in ``prefill`` order.

    The ``n_generating`` decode tokens are always in the batch (the caller guarantees
    ``n_generating <= n_batch``); prompt tokens fill the rest.
    """
    budget = n_batch - n_generating
    if n_generating:
        budget = min(budget, prefill_chunk)
    out: list[tuple[int, int]] = []
    for work in prefill:
        if budget <= 0:
            break
        take = min(work.remaining, budget)
        if take > 0:
            out.append((work.key, take))
            budget -= take
    return out
