"""fleet.memory against the real Gemma 3 270M header, the sizes llama.cpp itself reports and the
resident memory bench/memory_estimate.py measured (docs/benchmarks.md)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config import EngineSettings, Settings
from agent.daemon.candidates import model_memory_estimate
from agent.daemon.catalog import info_for_file
from fleet.memory import (
    MIB,
    REPACKABLE_TYPES,
    ModelShape,
    RuntimeParams,
    estimate,
    fmt_bytes,
    kv_cache_bytes,
    kv_cells,
    kv_stream_cells,
    kv_streams,
    repack_types,
    shape_from_gguf,
    weights_bytes,
)
from registry.gguf_info import read_gguf_info

KIB = 1 << 10


@pytest.fixture(scope="module")
def gemma_shape(gemma_path: Path) -> ModelShape:
    return shape_from_gguf(read_gguf_info(gemma_path))


# llama.cpp's own log for this file ("llama_kv_cache: size = ... MiB", non-SWA + SWA caches) with the
# context the engine creates: n_ctx cells when unified, n_ctx x n_seq split into n_seq streams
# otherwise. Gemma 3 270M: 3 global + 15 sliding-window layers, 1 KiB per layer and cell.
@pytest.mark.parametrize(
    ("n_ctx", "n_seq", "unified", "swa_full", "size"),
    [
        (2048, 1, False, True, 36 * MIB),
        (8192, 1, False, True, 144 * MIB),
        (32768, 1, False, True, 576 * MIB),
        (32768, 1, False, False, (96 + 15) * MIB),
        (2048, 4, True, True, 36 * MIB),  # logged 6 + 30 MiB, "4/1 seqs"
        (2048, 4, False, True, 144 * MIB),  # logged 24 + 120 MiB, "4/4 seqs"
        (32768, 4, True, False, 96 * MIB + 15 * 2560 * KIB),  # SWA: pad(512 x 4 + 512) cells
        (32768, 4, False, False, 4 * (96 + 15) * MIB),  # logged 384 + 60 MiB: SWA 1024 cells a stream
        (1000, 3, False, True, 54 * MIB),  # logged 9 + 45 MiB: n_ctx_seq 1024
    ],
    ids=[
        "2k",
        "8k",
        "32k",
        "32k-swa-window",
        "2k-4-slots-unified",
        "2k-4-slots-a-stream-each",
        "32k-4-slots-unified-swa-window",
        "32k-4-slots-a-stream-each-swa-window",
        "1000-3-slots-padded",
    ],
)
def test_kv_cache_matches_llama_cpp(
    gemma_shape: ModelShape, n_ctx: int, n_seq: int, unified: bool, swa_full: bool, size: int
) -> None:
    params = RuntimeParams(n_ctx=n_ctx, n_seq=n_seq, kv_unified=unified, swa_full=swa_full)
    assert kv_cache_bytes(gemma_shape, params) == size


@pytest.mark.parametrize(
    ("n_ctx", "n_seq", "unified", "streams", "cells"),
    [
        (2048, 1, False, 1, 2048),
        (2048, 4, True, 1, 2048),
        (2048, 4, False, 4, 2048),
        (1000, 3, False, 3, 1024),
        (100, 1, True, 1, 256),
        (300, 2, False, 2, 512),
    ],
    ids=["one-seq", "unified", "a-stream-each", "padded-share", "tiny-unified", "tiny-streams"],
)
def test_streams_and_cells_follow_llama_cpp(
    n_ctx: int, n_seq: int, unified: bool, streams: int, cells: int
) -> None:
    params = RuntimeParams(n_ctx=n_ctx, n_seq=n_seq, kv_unified=unified)
    assert (kv_streams(params), kv_stream_cells(params)) == (streams, cells)


def test_swa_cells_are_window_plus_ubatch(gemma_shape: ModelShape) -> None:
    params = RuntimeParams(n_ctx=32768, swa_full=False)
    assert kv_cells(gemma_shape, 0, params) == 1024  # pad(512 + 512, 256)
    assert kv_cells(gemma_shape, 5, params) == 32768  # global layer
    assert kv_cells(gemma_shape, 0, RuntimeParams(n_ctx=700, swa_full=False)) == 768
    unified = RuntimeParams(n_ctx=32768, swa_full=False, n_seq=4, kv_unified=True)
    assert kv_cells(gemma_shape, 0, unified) == 2560  # pad(512 x 4 + 512): one window per sequence


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


# Which tensor types llama.cpp's CPU repack takes (ggml-cpu/repack.cpp, llama-cpp-python 0.3.36).
@pytest.mark.parametrize(
    ("arch", "features", "types"),
    [
        ("x86_64", {"avx", "avx2", "fma"}, {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}),
        ("x86_64", {"avx", "avx2", "avx512f", "amx_tile"}, {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4", "Q2_K"}),
        ("x86_64", {"sse4_2"}, set()),
        ("aarch64", {"neon"}, set()),
        ("aarch64", {"neon", "dotprod"}, {"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "MXFP4", "Q1_0"}),
        ("aarch64", set(), set(REPACKABLE_TYPES)),
        ("unknown", set(), set(REPACKABLE_TYPES)),
    ],
    ids=[
        "x86-avx2",
        "x86-avx512-amx",
        "x86-no-avx2",
        "cortex-a72-neon",
        "cortex-a76-dotprod",
        "arm-features-unknown",
        "unknown-cpu",
    ],
)
def test_repack_types_by_cpu(arch: str, features: set[str], types: set[str]) -> None:
    assert repack_types(arch, frozenset(features)) == frozenset(types)


# Gemma 3 270M Q4_K_M holds Q4_K (12.6 MiB), Q6_K, Q5_0, Q8_0 (the 170 MiB token embedding) and F32.
@pytest.mark.parametrize(
    ("repack", "arch", "features", "header", "extra"),
    [
        (False, "x86_64", {"avx2", "avx512f"}, True, set()),
        (True, "x86_64", {"avx2", "avx512f"}, True, {"Q4_K"}),
        (True, "aarch64", {"neon", "dotprod"}, True, {"Q4_K", "Q6_K", "Q8_0"}),
        (True, "unknown", set(), True, {"Q4_K", "Q6_K", "Q8_0"}),
        (True, "x86_64", {"avx2"}, False, {"*"}),
    ],
    ids=[
        "plain-kernels",
        "repack-x86-avx512",
        "repack-arm-dotprod",
        "repack-unknown-cpu",
        "repack-no-header",
    ],
)
def test_repacked_tensors_count_twice(
    gemma_shape: ModelShape, repack: bool, arch: str, features: set[str], header: bool, extra: set[str]
) -> None:
    shape = gemma_shape if header else replace(gemma_shape, bytes_by_type=())
    params = RuntimeParams(repack=repack, repack_types=repack_types(arch, frozenset(features)))
    by_type = dict(gemma_shape.bytes_by_type)
    copies = shape.file_size if "*" in extra else sum(by_type[t] for t in extra)
    assert weights_bytes(shape, params) == shape.file_size + copies


# The pool's hook (and `edge-agent select`) estimate the engine's own context: n_parallel slots,
# a KV stream each unless kv_unified (plain kernels here, so no repacked copies in the total).
@pytest.mark.parametrize(
    ("engine", "kv"),
    [
        (EngineSettings(n_ctx=2048, batch_invariant=True), 4 * 36 * MIB),
        (EngineSettings(n_ctx=2048, kv_unified=True, batch_invariant=True), 36 * MIB),
        (EngineSettings(n_ctx=2048, n_parallel=1, batch_invariant=True), 36 * MIB),
        (EngineSettings(n_ctx=4096, n_parallel=8, batch_invariant=True), 8 * 72 * MIB),
    ],
    ids=["defaults-4-slots-a-stream-each", "unified", "one-slot", "8-slots-of-4k"],
)
def test_the_pool_estimates_with_the_engines_settings(
    gemma_path: Path, gemma_shape: ModelShape, engine: EngineSettings, kv: int
) -> None:
    total = model_memory_estimate(Settings(engine=engine))(info_for_file(gemma_path))
    without_kv = estimate(gemma_shape, RuntimeParams(n_ctx=engine.n_ctx, n_seq=engine.n_parallel))
    assert total == without_kv.total - without_kv.kv_cache + kv


# Peak RSS increase measured by bench/memory_estimate.py (docs/benchmarks.md: Selection). The bound
# the selection relies on: at most 20 % over, never more than 10 % under.
@pytest.mark.parametrize(
    ("n_ctx", "used", "unified", "repack", "measured_mib"),
    [
        (2048, 1883, False, False, 459),
        (8192, 1883, False, False, 899),
        (32768, 1883, False, False, 2636),
        (8192, 7786, False, False, 949),
        (32768, 7786, False, False, 2686),
        (2048, 1883, True, False, 350),
        (32768, 1883, True, False, 898),
        (2048, 1883, False, True, 463),
        (32768, 1883, False, True, 2640),
        (2048, 1883, True, False, 348),
        (8192, 1883, True, False, 463),
        (32768, 1883, True, False, 904),
    ],
    ids=[
        "xeon-avx512-amx-2k",
        "xeon-avx512-amx-8k",
        "xeon-avx512-amx-32k",
        "xeon-avx512-amx-8k-long-prompt",
        "xeon-avx512-amx-32k-long-prompt",
        "xeon-avx512-amx-2k-unified",
        "xeon-avx512-amx-32k-unified",
        "xeon-avx512-amx-2k-repack",
        "xeon-avx512-amx-32k-repack",
        "epyc-avx2-2k-unified",
        "epyc-avx2-8k-unified",
        "epyc-avx2-32k-unified",
    ],
)
def test_estimate_bounds_the_measured_peak(
    gemma_shape: ModelShape, n_ctx: int, used: int, unified: bool, repack: bool, measured_mib: int
) -> None:
    params = RuntimeParams(
        n_ctx=n_ctx,
        n_seq=4,
        kv_unified=unified,
        repack=repack,
        repack_types=repack_types("x86_64", frozenset({"avx2", "avx512f"})),
        context_used=used,
    )
    error = estimate(gemma_shape, params).total / (measured_mib * MIB) - 1
    assert -0.10 <= error <= 0.20


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
    n_ctx=st.integers(128, 1 << 15),
    a=st.integers(1, 16),
    b=st.integers(1, 16),
    full=st.booleans(),
)
def test_a_stream_per_slot_never_estimates_less(
    shape: ModelShape, n_ctx: int, a: int, b: int, full: bool
) -> None:
    lo, hi = sorted((a, b))
    for unified in (True, False):
        few = estimate(shape, RuntimeParams(n_ctx=n_ctx, n_seq=lo, kv_unified=unified, swa_full=full))
        many = estimate(shape, RuntimeParams(n_ctx=n_ctx, n_seq=hi, kv_unified=unified, swa_full=full))
        assert few.total <= many.total
    shared = estimate(shape, RuntimeParams(n_ctx=n_ctx, n_seq=hi, kv_unified=True, swa_full=full))
    streams = estimate(shape, RuntimeParams(n_ctx=n_ctx, n_seq=hi, kv_unified=False, swa_full=full))
    assert shared.kv_cache <= streams.kv_cache
    repacked = estimate(shape, RuntimeParams(n_ctx=n_ctx, n_seq=hi, repack=True, swa_full=full))
    assert repacked.total >= streams.total


@given(
    shape=shapes,
    n_ctx=st.integers(128, 1 << 16),
    n_seq=st.integers(1, 8),
    unified=st.booleans(),
    full=st.booleans(),
    per_layer=st.booleans(),
)
def test_fast_kv_sum_equals_the_per_layer_definition(
    shape: ModelShape, n_ctx: int, n_seq: int, unified: bool, full: bool, per_layer: bool
) -> None:
    if per_layer:
        shape = replace(shape, n_head_kv=tuple((i % 4) + 1 for i in range(shape.n_layers)))
    params = RuntimeParams(n_ctx=n_ctx, n_seq=n_seq, kv_unified=unified, swa_full=full)
    width = shape.key_length + shape.value_length
    per_stream = sum(
        kv_cells(shape, il, params) * shape.kv_heads(il) * width * 2 for il in range(shape.n_layers)
    )
    assert kv_cache_bytes(shape, params) == kv_streams(params) * per_stream
