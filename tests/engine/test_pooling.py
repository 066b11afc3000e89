"""Mean pooling and normalisation (pure numpy)."""

from __future__ import annotations

import numpy as np

from agent.engine.vector_pooling import l2_normalize, mean_pool


def test_mean_pool_ignores_padding() -> None:
    hidden = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = np.array([[1, 1, 0]])
    assert mean_pool(hidden, mask).tolist() == [[2.0, 3.0]]


def test_l2_normalize_unit_rows_and_zero_row_stays_zero() -> None:
    out = l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])
    assert not np.isnan(out).any()
