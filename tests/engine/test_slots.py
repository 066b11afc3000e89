"""Slot choice, prefix reuse and step planning (pure)."""

from __future__ import annotations

import pytest

from agent.engine.slots import (
    PrefillWork,
    SlotView,
    choose_slot,
    chunk_end,
    common_prefix,
    plan_step,
    reusable_prefix,
)


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        pytest.param([], [1], 0, id="empty"),
        pytest.param([1, 2, 3], [1, 2, 4], 2, id="diverge"),
        pytest.param([1, 2], [1, 2, 3], 2, id="prefix"),
        pytest.param([5], [6], 0, id="different"),
    ],
)
def test_common_prefix(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix(a, b) == n


@pytest.mark.parametrize(
    ("cached", "prompt", "canonical", "align", "n"),
    [
        pytest.param([1, 2, 3], [1, 2, 3], None, 1, 2, id="identical-keeps-one-to-decode"),
        pytest.param([1, 2, 3, 4], [1, 2], None, 1, 1, id="shorter-prompt"),
        pytest.param([1, 2], [1, 2, 3, 4], None, 1, 2, id="extension"),
        pytest.param([], [7], None, 1, 0, id="empty-cache"),
        pytest.param(list(range(20)), list(range(30)), None, 8, 16, id="rounded-to-chunk"),
        pytest.param(list(range(20)), list(range(30)), 8, 8, 8, id="limited-to-canonical"),
        pytest.param(list(range(20)), list(range(30)), 20, 1, 20, id="no-alignment"),
    ],
)
def test_reusable_prefix(
    cached: list[int], prompt: list[int], canonical: int | None, align: int, n: int
) -> None:
    assert reusable_prefix(cached, prompt, canonical, align) == n


def test_choose_slot_prefers_longest_prefix_then_least_recently_used() -> None:
    free = [
        SlotView(0, [9, 9, 9], last_used=1),
        SlotView(1, [1, 2, 3, 4], last_used=5),
        SlotView(2, [1, 2], last_used=2),
    ]
    assert choose_slot(free, [1, 2, 3, 4, 5]) == (1, 4)
    assert choose_slot(free, [1, 2, 3, 4, 5], align=2) == (1, 4)
    assert choose_slot([SlotView(0, [], 7), SlotView(1, [], 3)], [4, 4]) == (1, 0)
    with pytest.raises(ValueError, match="no free slot"):
        choose_slot([], [1])


@pytest.mark.parametrize(
    ("busy", "want"),
    [
        pytest.param(set(), 5, id="nothing-busy-least-recently-used"),
        pytest.param({0, 1}, 2, id="extends-a-run"),
        pytest.param({0, 1, 3}, 2, id="closes-a-gap"),
        pytest.param({1, 2, 3, 4}, 5, id="both-ends-equal-then-lru"),
        pytest.param({6}, 5, id="neighbour-of-the-last"),
    ],
)
def test_choose_slot_keeps_busy_slots_contiguous_among_equal_prefixes(busy: set[int], want: int) -> None:
    free = [SlotView(i, [], last_used={5: 0}.get(i, 10 - i)) for i in range(8) if i not in busy]
    assert choose_slot(free, [4, 4], busy=busy) == (want, 0)


def test_longer_prefix_wins_over_a_busy_neighbour() -> None:
    free = [SlotView(2, [7, 7, 7, 7, 1], last_used=1), SlotView(6, [1, 2, 3, 4, 5], last_used=9)]
    assert choose_slot(free, [1, 2, 3, 4, 5, 6], busy={1, 3}) == (6, 5)


@pytest.mark.parametrize(
    ("n_gen", "work", "n_batch", "chunk", "plan"),
    [
        pytest.param(0, [(0, 0, 1000)], 512, 256, [(0, 0, 256), (0, 256, 512)], id="idle-fills-the-batch"),
        pytest.param(3, [(0, 0, 1000)], 512, 64, [(0, 0, 64)], id="generating-one-chunk"),
        pytest.param(0, [(0, 10, 100)], 512, 64, [(0, 10, 64), (0, 64, 100)], id="cut-at-fixed-positions"),
        pytest.param(2, [(0, 0, 10), (1, 0, 100)], 512, 64, [(0, 0, 10)], id="whole-chunks-only"),
        pytest.param(0, [(0, 0, 10), (1, 0, 20)], 512, 64, [(0, 0, 10), (1, 0, 20)], id="several-prompts"),
        pytest.param(30, [(0, 0, 10)], 32, 64, [], id="batch-nearly-full"),
        pytest.param(0, [(0, 0, 100)], 32, 64, [(0, 0, 32)], id="chunk-capped-by-batch"),
    ],
)
def test_plan_step(
    n_gen: int, work: list[tuple[int, int, int]], n_batch: int, chunk: int, plan: list[tuple[int, int, int]]
) -> None:
    assert plan_step(n_gen, [PrefillWork(*w) for w in work], n_batch, chunk) == plan


@pytest.mark.parametrize(
    ("done", "total", "chunk", "end"),
    [
        pytest.param(0, 100, 64, 64, id="first"),
        pytest.param(64, 100, 64, 100, id="last-partial"),
        pytest.param(10, 100, 64, 64, id="after-reuse"),
        pytest.param(0, 5, 64, 5, id="short"),
    ],
)
def test_chunk_end(done: int, total: int, chunk: int, end: int) -> None:
    assert chunk_end(done, total, chunk) == end
