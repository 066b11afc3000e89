"""Packing embedding inputs into llama.cpp batches (pure)."""

from __future__ import annotations

import pytest

from agent.engine.llama_embed import pack_batches


@pytest.mark.parametrize(
    ("lengths", "n_batch", "max_seqs", "groups"),
    [
        pytest.param([3, 3, 3], 10, 8, [[0, 1, 2]], id="all-fit"),
        pytest.param([6, 6, 6], 10, 8, [[0], [1], [2]], id="token-limit"),
        pytest.param([1, 1, 1, 1, 1], 100, 2, [[0, 1], [2, 3], [4]], id="sequence-limit"),
        pytest.param([10, 1], 10, 8, [[0], [1]], id="exactly-full"),
        pytest.param([], 10, 8, [], id="empty"),
        pytest.param([2, 2, 2], 100, 1, [[0], [1], [2]], id="one-per-batch"),
    ],
)
def test_pack_batches(lengths: list[int], n_batch: int, max_seqs: int, groups: list[list[int]]) -> None:
    assert pack_batches(lengths, n_batch, max_seqs) == groups
