"""Slot choice, prefix reuse and step planning (pure)."""

from __future__ import annotations

import pytest

from agent.engine.slots import PrefillWork, SlotView, choose_slot, common_prefix, plan_step, reusable_prefix


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
    ("cached", "prompt", "n"),
    [
        pytest.param([1, 2, 3], [1, 2, 3], 2, id="identical-keeps-one-to-decode"),
        pytest.param([1, 2, 3, 4], [1, 2], 1, id="shorter-prompt"),
        pytest.param([1, 2], [1, 2, 3, 4], 2, id="extension"),
        pytest.param([], [7], 0, id="empty-cache"),
    ],
)
def test_reusable_prefix(cached: list[int], prompt: list[int], n: int) -> None:
    assert reusable_prefix(cached, prompt) == n


def test_choose_slot_prefers_longest_prefix_then_least_recently_used() -> None:
    free = [
        SlotView(0, [9, 9, 9], last_used=1),
        SlotView(1, [1, 2, 3, 4], last_used=5),
        SlotView(2, [1, 2], last_used=2),
    ]
    assert choose_slot(free, [1, 2, 3, 4, 5]) == (1, 4)
    assert choose_slot([SlotView(0, [], 7), SlotView(1, [], 3)], [4, 4]) == (1, 0)
    with pytest.raises(ValueError, match="no free slot"):
        choose_slot([], [1])


@pytest.mark.parametrize(
    ("n_gen", "work", "n_batch", "chunk", "plan"),
    [
        pytest.param(0, [(0, 1000)], 512, 64, [(0, 512)], id="idle-uses-whole-batch"),
        pytest.param(3, [(0, 1000)], 512, 64, [(0, 64)], id="generating-caps-chunk"),
        pytest.param(2, [(0, 10), (1, 100)], 512, 64, [(0, 10), (1, 54)], id="several-prompts"),
        pytest.param(30, [(0, 10)], 32, 64, [(0, 2)], id="batch-nearly-full"),
        pytest.param(32, [(0, 10)], 32, 64, [], id="batch-full"),
    ],
)
def test_plan_step(
    n_gen: int, work: list[tuple[int, int]], n_batch: int, chunk: int, plan: list[tuple[int, int]]
) -> None:
    assert plan_step(n_gen, [PrefillWork(k, r) for k, r in work], n_batch, chunk) == plan
