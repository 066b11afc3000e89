"""Slot choice, prefix reuse and step planning (pure)."""

from __future__ import annotations

import pytest

from agent.engine.slots import (
    PrefillWork,
    SlotView,
    Source,
    best_source,
    choose_slot,
    chunk_end,
    common_prefix,
    pending_prefix,
    plan_step,
    reusable_prefix,
    worth_copying,
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


@pytest.mark.parametrize(
    ("slots", "prompt", "align", "want"),
    [
        pytest.param([SlotView(0, [9], 0)], [1, 2], 1, None, id="nothing-shared"),
        pytest.param(
            [SlotView(0, [1, 2], 0), SlotView(3, [1, 2, 3, 4], 0)],
            [1, 2, 3, 4, 5],
            1,
            Source(3, 4),
            id="longest",
        ),
        pytest.param(
            [SlotView(1, [1, 2, 3], 0), SlotView(2, [1, 2, 3], 0)],
            [1, 2, 3, 9],
            1,
            Source(1, 3),
            id="tie-lowest-index",
        ),
        pytest.param(
            [SlotView(0, list(range(20)), 0, canonical=8)],
            list(range(30)),
            8,
            Source(0, 8),
            id="canonical-aligned",
        ),
        pytest.param([SlotView(0, [1, 2, 3], 0)], [1, 2, 3], 1, Source(0, 2), id="leaves-one-token"),
    ],
)
def test_best_source(slots: list[SlotView], prompt: list[int], align: int, want: Source | None) -> None:
    assert best_source(slots, prompt, align) == want


@pytest.mark.parametrize(
    ("own", "source", "gain", "want"),
    [
        pytest.param(0, None, 16, False, id="no-source"),
        pytest.param(0, Source(1, 15), 16, False, id="gain-too-small"),
        pytest.param(10, Source(1, 26), 16, True, id="gain-enough"),
        pytest.param(30, Source(1, 26), 0, False, id="own-is-longer"),
    ],
)
def test_worth_copying(own: int, source: Source | None, gain: int, want: bool) -> None:
    assert worth_copying(own, source, gain) is want


@pytest.mark.parametrize(
    ("running", "prompt", "align", "want"),
    [
        pytest.param([], [1, 2, 3], 1, None, id="nothing-running"),
        pytest.param([(0, [1, 2, 3, 4, 5], 1)], [1, 2, 3, 4, 9], 1, (0, 4), id="ahead"),
        pytest.param([(0, [1, 2, 3, 4, 5], 4)], [1, 2, 3, 4, 9], 1, None, id="already-decoded"),
        pytest.param(
            [(0, [1, 2, 3], 0), (1, [1, 2, 3, 4, 5], 0)], [1, 2, 3, 4, 5, 6], 1, (1, 5), id="longest"
        ),
        pytest.param([(0, list(range(20)), 0)], list(range(30)), 8, (0, 16), id="aligned"),
        pytest.param([(0, [1, 2, 3], 0)], [1, 2, 3], 1, (0, 2), id="leaves-one-token"),
    ],
)
def test_pending_prefix(
    running: list[tuple[int, list[int], int]], prompt: list[int], align: int, want: tuple[int, int] | None
) -> None:
    assert pending_prefix(running, prompt, align) == want
