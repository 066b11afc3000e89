"""Sentence vectors from token vectors (pure numpy): mean pooling and L2 normalisation.

Invariants: padding positions (mask 0) never contribute to a mean; a vector of zeros stays zero
instead of becoming NaN; every returned row has unit length otherwise.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["l2_normalize", "mean_pool"]


def mean_pool(hidden: Any, mask: Any) -> Any:
    """``hidden`` [batch, seq, dim], ``mask`` [batch, seq] (1 = real token) -> [batch, dim]."""
    h = np.asarray(hidden, dtype=np.float32)
    m = np.asarray(mask, dtype=np.float32)[..., None]
    summed = (h * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    return summed / counts


def l2_normalize(vectors: Any) -> Any:
    """Rows scaled to unit L2 norm; all-zero rows are returned unchanged."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norms == 0, 1.0, norms)
