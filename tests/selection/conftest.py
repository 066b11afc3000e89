from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import MODEL_CACHE

VARIANTS = {"F16": 1, "Q8_0": 7, "Q5_1": 9, "Q4_0": 2}
"""Real variants of Gemma 3 270M made from the Q4_K_M file (llama_ftype values)."""


def quantize_variant(source: Path, name: str, directory: Path = MODEL_CACHE) -> Path:
    """Re-quantize ``source`` with llama.cpp into ``directory`` once; later calls reuse the file."""
    import llama_cpp

    target = directory / f"gemma-3-270m-{name.lower()}.gguf"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = VARIANTS[name]
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize({name}) failed with {rc}")
    os.replace(tmp, target)
    return target


@pytest.fixture(scope="session")
def gemma_variants(gemma_path: Path) -> dict[str, Path]:
    """Q4_K_M (the published file) plus F16, Q8_0, Q5_1 and Q4_0 made from it, cached on disk."""
    out = {"Q4_K_M": gemma_path}
    for name in VARIANTS:
        out[name] = quantize_variant(gemma_path, name)
    return out
