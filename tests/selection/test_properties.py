"""Hypothesis properties of fleet.selection.select over synthetic candidates and profiles."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.hardware import CpuInfo, HardwareProfile, MemoryInfo
from fleet.memory import MIB, ModelShape, RuntimeParams
from fleet.selection import Candidate, SelectionPolicy, select

FEATURES = ["neon", "dotprod", "avx2", "avx512f"]


@st.composite
def candidates(draw: st.DrawFn, index: int) -> Candidate:
    params = draw(st.sampled_from([135, 270, 500, 1_000, 1_500, 3_000, 7_000])) * 1_000_000
    bpw = draw(st.sampled_from([4.5, 5.5, 6.6, 8.5, 16.0]))
    layers = draw(st.integers(4, 40))
    heads = draw(st.sampled_from([4, 8, 16, 32]))
    shape = ModelShape(
        file_size=int(params * bpw / 8),
        n_layers=layers,
        n_embd=heads * 64,
        n_head=heads,
        n_head_kv=(draw(st.sampled_from([1, 2, heads])),),
        key_length=64,
        value_length=64,
        n_vocab=draw(st.sampled_from([32_000, 128_256, 262_144])),
        sliding_window=draw(st.sampled_from([None, 512, 4096])),
        swa_layers=tuple(i % 6 != 5 for i in range(layers)),
    )
    return Candidate(
        id=f"m{index:03d}",
        family="synthetic",
        parameters=params,
        quantization=f"{bpw}bpw",
        bits_per_weight=bpw,
        format=draw(st.sampled_from(["gguf", "gguf", "onnx"])),
        task=draw(st.sampled_from(["completion", "chat", "embedding"])),
        shape=shape,
        context_length=draw(st.sampled_from([None, 2048, 32768])),
        min_cpu_features=frozenset(draw(st.lists(st.sampled_from(FEATURES), max_size=1))),
    )


@st.composite
def candidate_lists(draw: st.DrawFn) -> list[Candidate]:
    n = draw(st.integers(0, 12))
    return [draw(candidates(i)) for i in range(n)]


def box(available_mib: int, features: frozenset[str] = frozenset({"neon", "dotprod"})) -> HardwareProfile:
    return HardwareProfile(
        cpu=CpuInfo(arch="aarch64", model="Cortex-A76", physical_cores=4, logical_cores=4, features=features),
        memory=MemoryInfo(total_bytes=available_mib * MIB * 2, available_bytes=available_mib * MIB),
    )


policies = st.builds(
    SelectionPolicy,
    task=st.sampled_from([None, "completion", "chat"]),
    runtime=st.builds(RuntimeParams, n_ctx=st.sampled_from([512, 2048, 8192, 32768])),
    headroom_bytes=st.sampled_from([0, 128 * MIB, 512 * MIB]),
    speed_floor_tps=st.sampled_from([0.0, 1.0, 5.0]),
)


@settings(max_examples=150, deadline=None)
@given(cands=candidate_lists(), mib=st.integers(0, 64 * 1024), policy=policies)
def test_never_picks_a_model_whose_estimate_exceeds_the_budget(
    cands: list[Candidate], mib: int, policy: SelectionPolicy
) -> None:
    result = select(box(mib), cands, policy)
    if result.choice is not None:
        row = result.row(result.choice.id)
        assert row is not None and row.memory is not None and result.budget_bytes is not None
        assert row.memory.total <= result.budget_bytes
        assert row.verdict == "chosen"
    assert sum(r.verdict == "chosen" for r in result.rows) == (result.choice is not None)


@settings(max_examples=150, deadline=None)
@given(cands=candidate_lists(), a=st.integers(0, 64 * 1024), b=st.integers(0, 64 * 1024), policy=policies)
def test_more_memory_never_yields_a_lower_quality_pick(
    cands: list[Candidate], a: int, b: int, policy: SelectionPolicy
) -> None:
    lo, hi = sorted((a, b))
    small = select(box(lo), cands, policy).choice
    large = select(box(hi), cands, policy).choice
    if small is not None:
        assert large is not None
        assert large.quality >= small.quality


@settings(max_examples=100, deadline=None)
@given(cands=candidate_lists(), mib=st.integers(0, 64 * 1024), policy=policies, seed=st.randoms())
def test_choice_does_not_depend_on_candidate_order(
    cands: list[Candidate], mib: int, policy: SelectionPolicy, seed: object
) -> None:
    shuffled = list(cands)
    seed.shuffle(shuffled)  # type: ignore[attr-defined]
    first = select(box(mib), cands, policy)
    second = select(box(mib), shuffled, policy)
    assert first.choice == second.choice
    assert [r.candidate.id for r in first.rows] == [r.candidate.id for r in second.rows]


@settings(max_examples=100, deadline=None)
@given(cands=candidate_lists(), mib=st.integers(0, 64 * 1024))
def test_missing_cpu_features_are_never_chosen(cands: list[Candidate], mib: int) -> None:
    result = select(box(mib, frozenset({"neon"})), cands, replace(SelectionPolicy(), task=None))
    if result.choice is not None:
        assert result.choice.min_cpu_features <= {"neon"}
