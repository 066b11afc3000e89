"""Selection excludes models made of tensor types that failed `edge-agent doctor` with this build."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from agent.cli import main
from agent.engine.doctor import DoctorReport, TypeResult, current_build, save_results
from agent.hardware.probe import probe
from fleet.hardware import HardwareProfile
from fleet.memory import ModelShape, RuntimeParams
from fleet.selection import (
    Candidate,
    SelectionPolicy,
    candidate_from_gguf,
    select,
    tensor_types_of,
)
from registry.gguf_info import read_gguf_info

MACHINES = Path(__file__).resolve().parent.parent / "fixtures" / "machines"
POLICY = SelectionPolicy(task="completion", runtime=RuntimeParams(n_ctx=2048))
SHAPE = ModelShape(
    file_size=300 << 20,
    n_layers=18,
    n_embd=640,
    n_head=4,
    n_head_kv=(1,),
    key_length=256,
    value_length=256,
    n_vocab=32000,
)


def nuc() -> HardwareProfile:
    return probe(MACHINES / "x86-nuc-16gb", gpus=lambda: (), onnx_providers=lambda: ("CPUExecutionProvider",))


def cand(
    model_id: str, quant: str, types: tuple[str, ...] = (), *, params: int = 270_000_000, fmt: str = "gguf"
) -> Candidate:
    return Candidate(
        model_id, "llama", params, quant, 5.0, fmt, "completion", SHAPE, tensor_types=frozenset(types)
    )


# id, candidates, failed types, pin, expected choice, {candidate: words in its reason (None: not rejected)}
CASES = [
    (
        "header-holds-a-failed-type",
        [cand("m", "Q4_K_M", ("F32", "Q4_K", "Q6_K"))],
        {"Q6_K"},
        None,
        None,
        {"m": "tensor type Q6_K failed `edge-agent doctor` with this llama.cpp build"},
    ),
    (
        "k-quant-file-with-a-legacy-fallback",
        [cand("m", "Q4_K_M", ("F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"))],
        {"Q5_0"},
        None,
        None,
        {"m": "tensor type Q5_0 failed"},
    ),
    (
        "every-failed-type-is-named",
        [cand("m", "Q4_0", ("F32", "Q4_0", "Q4_1"))],
        {"Q4_1", "Q4_0", "Q8_0"},
        None,
        None,
        {"m": "tensor type Q4_0, Q4_1 failed"},
    ),
    (
        "header-without-a-failed-type",
        [cand("m", "Q8_0", ("F32", "Q8_0"))],
        {"Q4_0"},
        None,
        "m",
        {"m": None},
    ),
    ("manifest-legacy-name", [cand("m", "Q4_0")], {"Q4_0"}, None, None, {"m": "tensor type Q4_0 failed"}),
    (
        "manifest-k-mix-counts-its-main-type",
        [cand("m", "Q4_K_M")],
        {"Q4_K"},
        None,
        None,
        {"m": "Q4_K failed"},
    ),
    ("manifest-other-name", [cand("m", "IQ4_NL")], {"IQ4_NL"}, None, None, {"m": "IQ4_NL failed"}),
    ("manifest-without-a-failed-type", [cand("m", "Q8_0")], {"Q4_0"}, None, "m", {"m": None}),
    ("doctor-not-run", [cand("m", "Q4_0", ("F32", "Q4_0"))], set(), None, "m", {"m": None}),
    ("onnx-is-not-llama-cpp", [cand("e", "INT8", fmt="onnx")], {"INT8"}, None, "e", {"e": None}),
    (
        "the-next-best-is-chosen",
        [cand("big", "Q4_0", ("F32", "Q4_0"), params=1_000_000_000), cand("small", "Q8_0", ("F32", "Q8_0"))],
        {"Q4_0"},
        None,
        "small",
        {"big": "tensor type Q4_0 failed", "small": None},
    ),
    (
        "a-pin-does-not-override-it",
        [cand("pinned", "Q4_0", ("F32", "Q4_0")), cand("other", "Q8_0", ("F32", "Q8_0"))],
        {"Q4_0"},
        "pinned",
        None,
        {"pinned": "tensor type Q4_0 failed"},
    ),
]


@pytest.mark.parametrize(
    ("candidates", "failed", "pin", "choice", "reasons"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_failed_tensor_types_rule(
    candidates: list[Candidate],
    failed: set[str],
    pin: str | None,
    choice: str | None,
    reasons: dict[str, str | None],
) -> None:
    policy = replace(POLICY, failed_types=frozenset(failed), pin=pin)
    result = select(nuc(), candidates, policy)
    assert (result.choice.id if result.choice else None) == choice, result.message
    for model_id, words in reasons.items():
        row = result.row(model_id)
        assert row is not None
        if words is None:
            assert row.verdict != "rejected", row.reason
        else:
            assert row.verdict == "rejected" and words in row.reason, row.reason
    if pin is not None and choice is None:
        assert result.message.startswith(f"pinned model {pin} cannot run here: tensor type")


NAMES = [
    ("legacy", "Q4_0", {"Q4_0"}),
    ("k-mix-medium", "Q4_K_M", {"Q4_K"}),
    ("k-mix-small", "Q3_K_S", {"Q3_K"}),
    ("k-mix-large", "Q3_K_L", {"Q3_K"}),
    ("k-pure", "Q6_K", {"Q6_K"}),
    ("i-quant-xs-is-a-type", "IQ4_XS", {"IQ4_XS"}),
    ("lower-case", "q5_k_m", {"Q5_K"}),
    ("gguf-enum-prefix", "MOSTLY_Q8_0", {"Q8_0"}),
    ("float", "F16", {"F16"}),
]


@pytest.mark.parametrize(("quant", "types"), [c[1:] for c in NAMES], ids=[c[0] for c in NAMES])
def test_tensor_types_from_a_quantization_name(quant: str, types: set[str]) -> None:
    assert tensor_types_of(cand("m", quant)) == types


@pytest.mark.model
def test_a_real_header_gives_every_tensor_type(gemma_path: Path) -> None:
    c = candidate_from_gguf(read_gguf_info(gemma_path), "gemma")
    assert {"Q4_K", "Q6_K", "Q8_0", "Q5_0", "F32"} <= c.tensor_types
    assert tensor_types_of(c) == c.tensor_types


# --- through `edge-agent select`, with doctor.json on disk ---------------------------------------


def _doctor(state: Path, build_id: str, failed: str) -> None:
    results = (TypeResult(failed, "crashed", 0.5, signal="SIGILL"), TypeResult("F16", "ok", 0.5))
    save_results(state, DoctorReport(build_id, None, "0.3.36", None, results, 1.0))


@pytest.mark.model
@pytest.mark.parametrize(
    ("build", "failed", "chosen"),
    [("this-build", "Q5_0", False), ("another-build", "Q5_0", True), ("this-build", "TQ1_0", True)],
    ids=["failed-here", "failed-on-another-build", "failed-type-not-in-the-file"],
)
def test_select_reads_doctor_results_of_this_build_only(
    tmp_path: Path,
    gemma_path: Path,
    capsys: pytest.CaptureFixture[str],
    build: str,
    failed: str,
    chosen: bool,
) -> None:
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text(f'state_dir = "{state}"\n[model]\npath = "{gemma_path}"\nid = "gemma"\n')
    build_id = current_build()[0] if build == "this-build" else "another-build"
    _doctor(state, build_id, failed)
    code = main(["--config", str(config), "select", "--json"])
    data = json.loads(capsys.readouterr().out)
    row = data["candidates"][0]
    if chosen:
        assert code == 0 and data["choice"] == "gemma"
    else:
        assert code == 1 and data["choice"] is None
        assert row["verdict"] == "rejected"
        assert row["reason"] == "tensor type Q5_0 failed `edge-agent doctor` with this llama.cpp build"
