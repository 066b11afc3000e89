"""Selection over named hardware profiles (replayed real snapshots) and real Gemma 3 270M variants."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path

import pytest

from agent.hardware.probe import probe
from fleet.hardware import HardwareProfile
from fleet.memory import MIB, RuntimeParams
from fleet.selection import (
    Candidate,
    SelectionPolicy,
    candidate_from_gguf,
    candidate_from_manifest,
    select,
)
from registry.gguf_info import read_gguf_info
from registry.metadata import ModelManifest

MACHINES = Path(__file__).resolve().parent.parent / "fixtures" / "machines"


def manifest(
    model_id: str,
    family: str,
    parameters: int,
    file_size: int,
    layers: int,
    heads: int,
    kv_heads: int,
    embd: int,
    vocab: int,
    *,
    task: str = "completion",
    fmt: str = "gguf",
    quant: str = "Q4_K_M",
    cpu: tuple[str, ...] = (),
) -> ModelManifest:
    chunk = 1 << 30
    digest = hashlib.sha256(model_id.encode()).hexdigest()
    return ModelManifest(
        id=model_id,
        version="1",
        family=family,
        parameters=parameters,
        quantization=quant,
        format=fmt,  # type: ignore[arg-type]
        task=task,  # type: ignore[arg-type]
        file_name=f"{model_id}.{fmt}",
        file_size=file_size,
        sha256=digest,
        chunk_size=chunk,
        chunk_sha256=(digest,) * math.ceil(file_size / chunk),
        context_length=32768 if fmt == "gguf" else None,
        n_layers=layers if fmt == "gguf" else None,
        n_heads=heads if fmt == "gguf" else None,
        n_kv_heads=kv_heads if fmt == "gguf" else None,
        embedding_length=embd if fmt == "gguf" else None,
        vocab_size=vocab if fmt == "gguf" else None,
        min_cpu_features=cpu,
    )


# Sizes and shapes of real published GGUF files (Q4_K_M) and a real ONNX encoder.
SYNTHETIC = [
    manifest("qwen2.5-1.5b", "qwen2", 1_543_714_304, 986_048_768, 28, 12, 2, 1536, 151936),
    manifest("llama-3.2-3b", "llama", 3_212_749_824, 2_019_377_696, 28, 24, 8, 3072, 128256),
    manifest("phi-3.5-mini", "phi3", 3_821_079_552, 2_393_232_672, 32, 32, 32, 3072, 32064),
    manifest("llama-3.1-8b", "llama", 8_030_261_248, 4_920_739_232, 32, 32, 8, 4096, 128256),
    manifest(
        "mistral-7b-avx512", "llama", 7_248_023_552, 4_368_439_584, 32, 32, 8, 4096, 32768, cpu=("avx512f",)
    ),
    manifest(
        "minilm-l6-int8",
        "bert",
        22_713_216,
        23_000_000,
        0,
        0,
        0,
        0,
        0,
        task="embedding",
        fmt="onnx",
        quant="INT8",
    ),
]


@pytest.fixture(scope="module")
def candidates(gemma_variants: dict[str, Path]) -> list[Candidate]:
    real = [
        candidate_from_gguf(read_gguf_info(path), f"gemma-3-270m-{name.lower()}")
        for name, path in sorted(gemma_variants.items())
    ]
    return real + [candidate_from_manifest(m) for m in SYNTHETIC]


def profile(name: str) -> HardwareProfile:
    return probe(MACHINES / name, gpus=lambda: (), onnx_providers=lambda: ("CPUExecutionProvider",))


POLICY = SelectionPolicy(task="completion", runtime=RuntimeParams(n_ctx=4096), speed_floor_tps=2.0)

# machine, policy changes, measured speeds, expected pick, words in its reason,
# {candidate: words in its rejection reason}
PROFILE_CASES = [
    (
        "rpi4-4gb",
        {},
        {},
        "qwen2.5-1.5b",
        "best quality that fits",
        {
            "llama-3.2-3b": "below the floor of 2 tok/s",
            "phi-3.5-mini": "needs 4.0 GiB, 2.9 GiB available",
            "llama-3.1-8b": "needs 5.4 GiB, 2.9 GiB available",
            "mistral-7b-avx512": "CPU lacks avx512f",
            "minilm-l6-int8": "task is embedding, completion wanted",
        },
    ),
    (
        "rpi5-8gb",
        {},
        {},
        "phi-3.5-mini",
        "best quality that fits",
        {
            "llama-3.1-8b": "1.1 tok/s (estimated) is below the floor",
            "mistral-7b-avx512": "CPU lacks avx512f",
        },
    ),
    ("jetson-orin-nano-8gb", {}, {}, "llama-3.1-8b", "best quality that fits", {}),
    (
        "x86-nuc-16gb",
        {},
        {"llama-3.1-8b": 7.9},  # measured by `edge-agent bench` on the box: beats the estimate
        "llama-3.1-8b",
        "best quality that fits",
        {"mistral-7b-avx512": "CPU lacks avx512f"},
    ),
    (
        "x86-nuc-16gb",
        {},
        {},
        "phi-3.5-mini",
        "best quality that fits",
        {"llama-3.1-8b": "(estimated) is below the floor"},
    ),
    (
        "container-1g",
        {"runtime": RuntimeParams(n_ctx=8192)},
        {},
        "gemma-3-270m-q8_0",
        "best quality that fits",
        {"gemma-3-270m-f16": "needs 820 MiB, 740 MiB available", "qwen2.5-1.5b": "needs 1.4 GiB"},
    ),
    ("container-512m", {}, {}, None, "", {"gemma-3-270m-q4_0": "needs 420 MiB, 232 MiB available"}),
    (  # q8_0 keys and values: 144 -> 76.5 MiB of KV, still 12 MiB short for the F16 file
        "container-1g",
        {"runtime": RuntimeParams(n_ctx=8192, kv_type_k="q8_0", kv_type_v="q8_0")},
        {},
        "gemma-3-270m-q8_0",
        "best quality that fits",
        {"gemma-3-270m-f16": "needs 752 MiB, 740 MiB available"},
    ),
    (  # q4_0 keys and values: 40.5 MiB of KV, and the F16 file fits only so
        "container-1g",
        {"runtime": RuntimeParams(n_ctx=8192, kv_type_k="q4_0", kv_type_v="q4_0")},
        {},
        "gemma-3-270m-f16",
        "best quality that fits",
        {},
    ),
]


@pytest.mark.model
@pytest.mark.parametrize(
    ("machine", "changes", "speeds", "pick", "why", "rejections"),
    PROFILE_CASES,
    ids=[
        "pi4-4gb",
        "pi5-8gb",
        "jetson-orin-nano",
        "nuc-measured",
        "nuc-estimated",
        "container-1g",
        "container-512m",
        "container-1g-kv-q8_0-still-too-small-for-f16",
        "container-1g-kv-q4_0-fits-f16",
    ],
)
def test_named_profiles(
    candidates: list[Candidate],
    machine: str,
    changes: dict[str, object],
    speeds: dict[str, float],
    pick: str | None,
    why: str,
    rejections: dict[str, str],
) -> None:
    result = select(profile(machine), candidates, replace(POLICY, **changes), speeds)  # type: ignore[arg-type]
    assert (result.choice.id if result.choice else None) == pick, result.message
    rows = {r.candidate.id: r for r in result.rows}
    assert len(rows) == len(candidates)
    if pick is not None:
        assert rows[pick].verdict == "chosen"
        assert why in rows[pick].reason
        assert result.rows[0].candidate.id == pick
    for model_id, words in rejections.items():
        assert rows[model_id].verdict == "rejected", rows[model_id]
        assert words in rows[model_id].reason, rows[model_id].reason
    if pick == "llama-3.1-8b" and speeds:
        assert rows[pick].speed_source == "measured" and rows[pick].speed_tps == 7.9


@pytest.mark.model
def test_nothing_fits_says_what_is_missing(candidates: list[Candidate]) -> None:
    result = select(profile("container-512m"), candidates, POLICY)
    assert result.choice is None
    assert result.message == (
        "nothing fits: the smallest candidate, gemma-3-270m-q4_0, needs 420 MiB, 232 MiB available "
        "(after 256 MiB headroom)"
    )


@pytest.mark.model
def test_gemma_variants_rank_by_precision(candidates: list[Candidate]) -> None:
    gemma = [c for c in candidates if c.family == "gemma3"]
    result = select(profile("rpi5-8gb"), gemma, POLICY)
    assert result.choice is not None and result.choice.quantization == "F16"
    order = [r.candidate.quantization for r in result.rows]
    assert order == ["F16", "Q8_0", "Q5_1", "Q4_K_M", "Q4_0"]
    assert [r.reason for r in result.rows[1:]] == ["fits; lower precision than the choice"] * 4


@pytest.mark.model
@pytest.mark.parametrize(
    ("changes", "pick", "message"),
    [
        ({"pin": "gemma-3-270m-q4_0"}, "gemma-3-270m-q4_0", "pinned"),
        ({"pin": "llama-3.2-3b"}, "llama-3.2-3b", "pinned"),  # below the speed floor: a pin overrides it
        ({"pin": "llama-3.1-8b"}, None, "pinned model llama-3.1-8b cannot run here: needs 5.4 GiB"),
        ({"pin": "nope"}, None, "pinned model nope is not installed"),
        ({"allowed": lambda c: c.family != "qwen2"}, "gemma-3-270m-f16", "best quality"),
        ({"backends": frozenset({"onnx"})}, None, "no candidate qualifies"),
        ({"task": "embedding"}, "minilm-l6-int8", "the only candidate that fits"),
        ({"headroom_bytes": 3 * 1024 * MIB}, None, "nothing fits"),
        ({"below": (1_543_714_304, 5.11)}, "gemma-3-270m-f16", "best quality"),
    ],
    ids=[
        "pin-small",
        "pin-overrides-floor",
        "pin-too-big",
        "pin-missing",
        "access-policy",
        "no-backend",
        "embedding-task",
        "headroom",
        "throttled-step-down",
    ],
)
def test_policy_knobs_on_a_pi4(
    candidates: list[Candidate], changes: dict[str, object], pick: str | None, message: str
) -> None:
    result = select(profile("rpi4-4gb"), candidates, replace(POLICY, **changes))  # type: ignore[arg-type]
    assert (result.choice.id if result.choice else None) == pick
    assert message in (result.rows[0].reason if pick else result.message)
    if "below" in changes:
        assert result.row("qwen2.5-1.5b").reason == "throttled: stepping down to a smaller model"  # type: ignore[union-attr]
    if "allowed" in changes:
        assert result.row("qwen2.5-1.5b") is not None
        assert result.row("qwen2.5-1.5b").reason == "denied by the access policy"  # type: ignore[union-attr]


@pytest.mark.model
def test_reserved_and_reclaimable_memory_move_the_budget(candidates: list[Candidate]) -> None:
    pi = profile("rpi4-4gb")
    base = select(pi, candidates, POLICY)
    loading = select(pi, candidates, replace(POLICY, reserved_bytes=2048 * MIB))
    assert base.budget_bytes is not None and loading.budget_bytes == base.budget_bytes - 2048 * MIB
    assert loading.choice is not None and loading.choice.family == "gemma3"
    freed = select(pi, candidates, replace(POLICY, reclaimable_bytes=2048 * MIB, speed_floor_tps=0.5))
    assert freed.choice is not None and freed.choice.id == "phi-3.5-mini"


def test_empty_candidate_list() -> None:
    result = select(profile("rpi5-8gb"), [], POLICY)
    assert result.choice is None
    assert result.message == "no candidate models: install or sync one first"


def test_unknown_memory_refuses_everything(tmp_path: Path) -> None:
    blank = probe(tmp_path, gpus=lambda: (), onnx_providers=lambda: ())
    cands = [candidate_from_manifest(SYNTHETIC[0])]
    result = select(blank, cands, POLICY)
    assert result.choice is None
    assert result.message == "cannot determine the available memory"
    assert result.rows[0].reason == "available memory unknown"
