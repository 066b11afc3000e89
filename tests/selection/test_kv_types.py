"""The KV cache's element types (``[engine] kv_cache_type_k`` / ``kv_cache_type_v``) in the memory
estimate and the settings: sizes llama.cpp itself reports for Gemma 3 270M, block overhead, the
pool's estimate with the engine's settings, and the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import EngineSettings, Settings, format_validation_error
from agent.daemon.candidates import model_memory_estimate
from agent.daemon.catalog import info_for_file
from fleet.memory import (
    MIB,
    ModelShape,
    RuntimeParams,
    estimate,
    kv_cache_bytes,
    kv_row_bytes,
    shape_from_gguf,
)
from registry.gguf_info import read_gguf_info


@pytest.fixture(scope="module")
def gemma_shape(gemma_path: Path) -> ModelShape:
    return shape_from_gguf(read_gguf_info(gemma_path))


@pytest.mark.parametrize(
    ("kv_type", "n_values", "size"),
    [
        pytest.param("f16", 256, 512, id="f16-two-bytes-a-value"),
        pytest.param("bf16", 256, 512, id="bf16-two-bytes-a-value"),
        pytest.param("q8_0", 256, 8 * 34, id="q8_0-34-bytes-per-32"),
        pytest.param("q4_0", 256, 8 * 18, id="q4_0-18-bytes-per-32"),
        pytest.param("q8_0", 80, 3 * 34, id="q8_0-partial-block-pays-whole"),
        pytest.param("q4_0", 1, 18, id="q4_0-one-value-one-block"),
    ],
)
def test_row_bytes_count_whole_blocks(kv_type: str, n_values: int, size: int) -> None:
    assert kv_row_bytes(kv_type, n_values) == size


# llama.cpp's own "CPU KV buffer size" log lines (non-SWA + SWA cache) for Gemma 3 270M, 8 slots of
# 4,096 cells each, a stream per slot, full-size SWA cache: 18 layers x 1 KV head x 256 + 256 values.
@pytest.mark.parametrize(
    ("type_k", "type_v", "size"),
    [
        pytest.param("f16", "f16", (96 + 480) * MIB, id="f16"),
        pytest.param("bf16", "bf16", (96 + 480) * MIB, id="bf16"),
        pytest.param("q8_0", "f16", int((73.5 + 367.5) * MIB), id="q8_0-keys-only"),
        pytest.param("q8_0", "q8_0", 306 * MIB, id="q8_0"),
        pytest.param("q4_0", "q4_0", 162 * MIB, id="q4_0"),
        pytest.param("q4_0", "q8_0", 234 * MIB, id="q4_0-keys-q8_0-values"),
    ],
)
def test_kv_cache_bytes_by_type(gemma_shape: ModelShape, type_k: str, type_v: str, size: int) -> None:
    params = RuntimeParams(n_ctx=4096, n_seq=8, kv_type_k=type_k, kv_type_v=type_v)
    assert kv_cache_bytes(gemma_shape, params) == size


@pytest.mark.parametrize(
    ("type_k", "type_v"),
    [
        pytest.param("q8_0", "f16", id="q8_0-keys"),
        pytest.param("q8_0", "q8_0", id="q8_0"),
        pytest.param("q4_0", "q4_0", id="q4_0"),
    ],
)
def test_a_quantized_cache_shrinks_only_the_kv_part(
    gemma_shape: ModelShape, type_k: str, type_v: str
) -> None:
    f16 = estimate(gemma_shape, RuntimeParams(n_ctx=4096, n_seq=4))
    quant = estimate(gemma_shape, RuntimeParams(n_ctx=4096, n_seq=4, kv_type_k=type_k, kv_type_v=type_v))
    assert quant.kv_cache < f16.kv_cache
    assert quant.total - quant.kv_cache == f16.total - f16.kv_cache


@pytest.mark.parametrize(
    ("engine", "kv"),
    [
        pytest.param(EngineSettings(n_ctx=2048), 4 * 36 * MIB, id="f16-default"),
        pytest.param(
            EngineSettings(n_ctx=2048, kv_cache_type_k="q8_0"),
            4 * 36 * MIB * (34 + 64) // 128,
            id="q8_0-keys",
        ),
        pytest.param(
            EngineSettings(n_ctx=2048, kv_cache_type_k="q4_0", kv_cache_type_v="q4_0", batch_invariant=False),
            4 * 36 * MIB * 18 // 64,
            id="q4_0-fast-mode",
        ),
    ],
)
def test_the_pool_estimates_with_the_kv_types(
    gemma_path: Path, gemma_shape: ModelShape, engine: EngineSettings, kv: int
) -> None:
    total = model_memory_estimate(Settings(engine=engine))(info_for_file(gemma_path))
    params = RuntimeParams(
        n_ctx=engine.n_ctx,
        n_seq=engine.n_parallel,
        repack=not engine.batch_invariant,
        kv_type_k=engine.kv_cache_type_k,
        kv_type_v=engine.kv_cache_type_v,
    )
    assert estimate(gemma_shape, params).kv_cache == kv
    assert total >= kv


@pytest.mark.parametrize(
    ("engine", "words"),
    [
        pytest.param(
            {"kv_cache_type_k": "q5_1"},
            "engine.kv_cache_type_k = 'q5_1': Input should be 'f16', 'bf16', 'q8_0' or 'q4_0'",
            id="unknown-k-type",
        ),
        pytest.param(
            {"kv_cache_type_v": "int8", "batch_invariant": False},
            "engine.kv_cache_type_v = 'int8': Input should be",
            id="unknown-v-type",
        ),
        pytest.param(
            {"kv_cache_type_v": "q8_0", "batch_invariant": True},
            "engine.kv_cache_type_v = 'q8_0' needs flash attention, "
            "which engine.batch_invariant = true turns off",
            id="quantized-v-with-batch-invariance",
        ),
        pytest.param(
            {"kv_cache_type_v": "q4_0", "batch_invariant": True},
            "set batch_invariant = false or a kv_cache_type_v of 'f16' or 'bf16'",
            id="quantized-v-says-how-to-fix",
        ),
    ],
)
def test_bad_kv_types_are_refused_by_name(engine: dict[str, object], words: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as err:
        Settings(engine=engine)  # type: ignore[arg-type]
    assert words in format_validation_error(err.value, "config error")


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param({"kv_cache_type_k": "q8_0"}, id="q8_0-keys-with-batch-invariance"),
        pytest.param({"kv_cache_type_k": "q4_0", "kv_cache_type_v": "bf16"}, id="q4_0-keys-bf16-values"),
        pytest.param(
            {"kv_cache_type_k": "q4_0", "kv_cache_type_v": "q4_0", "batch_invariant": False},
            id="q4_0-fast-mode",
        ),
    ],
)
def test_valid_kv_types_are_accepted(engine: dict[str, object]) -> None:
    settings = Settings(engine=engine)  # type: ignore[arg-type]
    assert settings.engine.kv_cache_type_k == engine["kv_cache_type_k"]
