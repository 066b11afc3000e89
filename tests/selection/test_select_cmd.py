"""`edge-agent probe`, `select` and `bench` through the real CLI, with the real Gemma 3 270M file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main
from agent.engine.base import ModelInfo
from agent.errors import AgentError
from agent.select_cmd import SPEEDS_FILE, load_speeds, measured_speeds, save_speeds


@pytest.fixture
def config(tmp_path: Path, gemma_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n[model]\npath = "{gemma_path}"\nid = "gemma"\n'
        "[engine]\nn_threads = 2\n"
    )
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_probe_json(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "--config", str(config), "probe", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["cpu"]["arch"] != "unknown"
    assert data["usable_memory_bytes"] > 0
    assert isinstance(data["notes"], list)


def test_probe_table(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "--config", str(config), "probe")
    assert code == 0
    assert "usable" in out and "simd" in out


def test_select_explain_and_json(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "--config", str(config), "select", "--explain")
    assert code == 0
    assert "gemma" in out and "chosen" in out and "estimated" in out
    assert out.strip().splitlines()[-1].startswith("gemma: the only candidate that fits; needs ")
    code, out, _ = run(capsys, "--config", str(config), "select", "--json", "--ctx", "32768")
    data = json.loads(out)
    assert data["choice"] == "gemma"
    row = data["candidates"][0]
    # 32k context with the full-size SWA cache llama.cpp is given: 576 MiB of KV per slot, and the
    # engine's 4 slots have a KV stream each (kv_unified = false).
    assert row["memory"]["kv_cache"] == 4 * 576 << 20
    assert row["quantization"] == "Q4_K_M"


def test_select_nothing_fits_exits_1(
    capsys: pytest.CaptureFixture[str], config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGE_AGENT_SELECTION__HEADROOM_MB", str(1 << 20))
    code, out, _ = run(capsys, "--config", str(config), "select")
    assert code == 1
    assert out.startswith("nothing fits: the smallest candidate, gemma, needs ")


def test_select_wrong_task(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, out, _ = run(capsys, "--config", str(config), "select", "--task", "embedding")
    assert code == 1
    assert out.strip() == "no candidate qualifies: task is completion, embedding wanted"


@pytest.mark.model
@pytest.mark.slow
def test_bench_stores_speeds_that_select_uses(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "--config", str(config), "bench", "--tokens", "8")
    assert code == 0, out
    stored = json.loads((tmp_path / "state" / SPEEDS_FILE).read_text())
    entry = stored["models"]["gemma"]
    assert entry["gen_tps"] > 0 and entry["prompt_tps"] > 0 and entry["gen_tokens"] == 8
    assert stored["bandwidth_gbps"] > 0
    code, out, _ = run(capsys, "--config", str(config), "select", "--json")
    row = json.loads(out)["candidates"][0]
    assert row["speed_source"] == "measured"
    assert row["speed_tps"] == pytest.approx(entry["gen_tps"], rel=0.01)


def test_bench_unknown_model_is_a_usage_error(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    code, _, err = run(capsys, "--config", str(config), "bench", "--model", "nope")
    assert code == 2
    assert "bench: model 'nope' is not installed" in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, {}),
        (b"{not json", {}),
        (b"[1, 2]", {}),
        (b" " * (2 << 20), {}),
        (b'{"models": {"m": {"gen_tps": 3.5, "file_size": 10}}}', {"m": 3.5}),
        (b'{"models": {"m": {"gen_tps": 3.5, "file_size": 11}}}', {}),
        (b'{"models": {"m": {"gen_tps": "fast", "file_size": 10}}}', {}),
    ],
    ids=["absent", "corrupt", "not-an-object", "too-large", "valid", "file-changed", "bad-value"],
)
def test_speeds_store_is_never_fatal(
    tmp_path: Path, content: bytes | None, expected: dict[str, float]
) -> None:
    path = tmp_path / "speeds.json"
    if content is not None:
        path.write_bytes(content)
    info = ModelInfo(id="m", path=tmp_path / "m.gguf", format="gguf", size_bytes=10)
    assert measured_speeds(load_speeds(path), [info]) == expected


def test_save_speeds_is_atomic_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "sel" / "speeds.json"
    save_speeds(path, {"models": {"m": {"gen_tps": 1.0}}})
    save_speeds(path, {"models": {"m": {"gen_tps": 2.0}}})
    assert load_speeds(path) == {"models": {"m": {"gen_tps": 2.0}}}
    assert [p.name for p in path.parent.iterdir()] == ["speeds.json"]


def test_save_speeds_failure_is_an_agent_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.raises(AgentError, match="cannot store the measured speeds"):
        save_speeds(blocker / "speeds.json", {"models": {}})


def test_onnx_candidate_reads_the_initializers() -> None:
    from agent.catalog import info_for_file
    from agent.demo import embedding_model_files
    from agent.select_cmd import candidate_for, onnx_initializers

    path, _ = embedding_model_files()
    weights, params = onnx_initializers(path)
    assert 22_000_000 < params < 23_000_000  # all-MiniLM-L6-v2
    assert weights < path.stat().st_size  # INT8 weights plus float norms and biases, no graph bytes
    candidate = candidate_for(info_for_file(path))
    assert candidate.task == "embedding" and candidate.parameters == params
    assert 7.5 < candidate.bits_per_weight < 9.0
    assert candidate.shape.initializer_bytes == weights


def test_unreadable_onnx_falls_back_to_the_file_size(tmp_path: Path) -> None:
    from agent.catalog import info_for_file
    from agent.select_cmd import candidate_for

    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07 not a protobuf graph" * 100)
    candidate = candidate_for(info_for_file(path))
    assert candidate.shape.initializer_bytes == path.stat().st_size
    assert candidate.parameters == 0


def test_candidates_are_read_again_only_when_the_file_changes(tmp_path: Path) -> None:
    import os

    from agent.catalog import info_for_file
    from agent.select_cmd import candidate_for

    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07 not a protobuf graph" * 100)
    first = candidate_for(info_for_file(path))
    assert candidate_for(info_for_file(path)) is first
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = candidate_for(info_for_file(path))
    assert touched is not first and touched == first
    path.write_bytes(b"\x08\x07 not a protobuf graph" * 200)
    grown = candidate_for(info_for_file(path))
    assert grown.shape.initializer_bytes == path.stat().st_size != first.shape.initializer_bytes


@pytest.mark.model
def test_startup_puts_the_best_fit_or_the_pin_first(tmp_path: Path, gemma_variants: dict[str, Path]) -> None:
    from agent.catalog import info_for_file
    from agent.config import SelectionSettings, Settings
    from agent.select_cmd import prefer_selected

    infos = [info_for_file(gemma_variants[q], f"gemma-{q.lower()}") for q in ("Q4_0", "Q8_0", "F16")]
    settings = Settings(state_dir=tmp_path)
    # This box has gigabytes free: the highest precision wins.
    assert [i.id for i in prefer_selected(settings, infos)] == ["gemma-f16", "gemma-q4_0", "gemma-q8_0"]
    pinned = settings.model_copy(update={"selection": SelectionSettings(pin="gemma-q8_0")})
    assert prefer_selected(pinned, infos)[0].id == "gemma-q8_0"
    # An unreadable file is skipped by the selection, never fatal.
    broken = [*infos, info_for_file(gemma_variants["Q4_0"], "gone")]
    object.__setattr__(broken[-1], "path", tmp_path / "missing.gguf")
    assert prefer_selected(settings, broken)[0].id == "gemma-f16"


def test_hub_pin_of_an_unenrolled_device_is_none(tmp_path: Path) -> None:
    from agent.config import Settings
    from agent.select_cmd import effective_pin, hub_pin

    assert hub_pin(Settings(state_dir=tmp_path)) is None
    assert effective_pin(Settings(state_dir=tmp_path)) is None


def test_measure_bandwidth_is_positive() -> None:
    from agent.hardware.probe import measure_bandwidth

    assert measure_bandwidth(mib=16, repeats=2) > 0.1
