"""agent.memory against the real Gemma 3 270M header and the sizes llama.cpp itself reports."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.memory import (
    MIB,
    ModelShape,
    RuntimeParams,
    estimate,
    fmt_bytes,
    kv_cache_bytes,
    kv_cells,
    shape_from_gguf,
)
from registry.gguf_info import read_gguf_info


@pytest.fixture(scope="module")
def gemma_shape(gemma_path: Path) -> ModelShape:
    return shape_from_gguf(read_gguf_info(gemma_path))


# llama.cpp's own log for this file ("llama_kv_cache: size = ... MiB"), swa_full on (the default of
# llama-cpp-python's context parameters): 3 global + 15 SWA layers x n_ctx cells x 1 KiB.
@pytest.mark.parametrize(
    ("n_ctx", "swa_full", "mib"),
    [(2048, True, 36), (8192, True, 144), (32768, True, 576), (32768, False, 96 + 15)],
    ids=["2k", "8k", "32k", "32k-swa-window"],
)
def test_kv_cache_matches_llama_cpp(gemma_shape: ModelShape, n_ctx: int, swa_full: bool, mib: int) -> None:
    assert kv_cache_bytes(gemma_shape, RuntimeParams(n_ctx=n_ctx, swa_full=swa_full)) == mib * MIB


def test_swa_cells_are_window_plus_ubatch(gemma_shape: ModelShape) -> None:
    params = RuntimeParams(n_ctx=32768, swa_full=False)
    assert kv_cells(gemma_shape, 0, params) == 1024  # pad(512 + 512, 256)
    assert kv_cells(gemma_shape, 5, params) == 32768  # global layer
    assert kv_cells(gemma_shape, 0, RuntimeParams(n_ctx=700, swa_full=False)) == 768


def test_compute_reservation_matches_llama_cpp(gemma_shape: ModelShape) -> None:
    # llama.cpp: "CPU compute buffer size = 514.50 MiB" (262144 x 512 x 4 bytes of logits + graph).
    est = estimate(gemma_shape, RuntimeParams(n_ctx=2048))
    assert 512 * MIB <= est.compute_reserved <= 530 * MIB
    assert est.output == MIB
    assert est.weights == gemma_shape.file_size
    assert est.reserved_total > est.total


def test_grouped_query_heads_shrink_the_cache() -> None:
    base = ModelShape(
        file_size=1 << 30,
        n_layers=16,
        n_embd=2048,
        n_head=32,
        n_head_kv=(32,),
        key_length=64,
        value_length=64,
        n_vocab=32000,
    )
    gqa = replace(base, n_head_kv=(8,))
    params = RuntimeParams(n_ctx=4096)
    assert kv_cache_bytes(base, params) == 4 * kv_cache_bytes(gqa, params)
    assert kv_cache_bytes(gqa, params) == 16 * 4096 * 8 * 128 * 2


def test_onnx_estimate_uses_initializers() -> None:
    shape = ModelShape.onnx(30 * MIB, 22 * MIB)
    est = estimate(shape, RuntimeParams())
    assert est.weights == 22 * MIB
    assert est.kv_cache == 0
    assert est.total > 22 * MIB


@pytest.mark.parametrize(
    ("n", "text"),
    [(512 * MIB, "512 MiB"), (1395864371, "1.3 GiB"), (0, "0 MiB")],
    ids=["mib", "gib", "zero"],
)
def test_fmt_bytes(n: int, text: str) -> None:
    assert fmt_bytes(n) == text


shapes = st.builds(
    ModelShape,
    file_size=st.integers(1, 1 << 34),
    n_layers=st.integers(1, 64),
    n_embd=st.integers(64, 8192),
    n_head=st.integers(1, 64),
    n_head_kv=st.tuples(st.integers(1, 16)),
    key_length=st.integers(16, 256),
    value_length=st.integers(16, 256),
    n_vocab=st.integers(256, 300_000),
    n_ff=st.integers(0, 30_000),
    sliding_window=st.one_of(st.none(), st.integers(64, 8192)),
    swa_layers=st.lists(st.booleans(), max_size=64).map(tuple),
)


@given(shape=shapes, a=st.integers(128, 1 << 17), b=st.integers(128, 1 << 17), full=st.booleans())
def test_estimate_is_monotonic_in_context(shape: ModelShape, a: int, b: int, full: bool) -> None:
    lo, hi = sorted((a, b))
    small = estimate(shape, RuntimeParams(n_ctx=lo, swa_full=full))
    large = estimate(shape, RuntimeParams(n_ctx=hi, swa_full=full))
    assert small.total <= large.total
    assert small.kv_cache <= large.kv_cache
    assert min(small.weights, small.kv_cache, small.compute, small.output, small.overhead) >= 0


@given(
    shape=shapes,
    n_ctx=st.integers(128, 1 << 16),
    full=st.booleans(),
    per_layer=st.booleans(),
)
def test_fast_kv_sum_equals_the_per_layer_definition(
    shape: ModelShape, n_ctx: int, full: bool, per_layer: bool
) -> None:
    if per_layer:
        shape = replace(shape, n_head_kv=tuple((i % 4) + 1 for i in range(shape.n_layers)))
    params = RuntimeParams(n_ctx=n_ctx, swa_full=full)
    width = shape.key_length + shape.value_length
    expected = sum(
        kv_cells(shape, il, params) * shape.kv_heads(il) * width * 2 for il in range(shape.n_layers)
    )
    assert kv_cache_bytes(shape, params) == expected
