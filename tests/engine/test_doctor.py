"""`edge-agent doctor` on this machine: real llama.cpp, real generated GGUF files, real child crashes.

The whole doctor runs once per module (``doctor_run``); the other runs share its generated models
(the cache directory is linked into their state directories), so each costs about a second.
A crashing child is made with the doctor's test-only hook (``EDGE_AGENT_DOCTOR_TEST_CRASH``): the
child really dies by the signal, the parent must name it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.engine.doctor import (
    CACHE_DIR,
    DOCTOR_FILE,
    TEST_CRASH_ENV,
    TYPE_NAMES,
    DoctorReport,
    TypeResult,
    cache_dir,
    current_build,
    failed_types_for,
    interpret,
    llama_cpp_version,
    load_results,
    parse_types,
    save_results,
)
from agent.errors import ConfigError
from registry.gguf_info import read_gguf_info

REQUIRED = ("F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL")
TERNARY = ("TQ1_0", "TQ2_0")


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str
    state: Path

    @property
    def data(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.out)
        return parsed


def doctor(state: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 120) -> Run:
    """``edge-agent --state-dir STATE doctor ARGS`` as a real process; the crash hook only if given."""
    environ = {k: v for k, v in os.environ.items() if k != TEST_CRASH_ENV}
    environ.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--state-dir", str(state), "doctor", *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=timeout,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr, state)


@pytest.fixture(scope="module")
def doctor_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The whole doctor, every type, once for this module."""
    return doctor(tmp_path_factory.mktemp("doctor-state"), "--json")


@pytest.fixture
def state(tmp_path: Path, doctor_run: Run) -> Path:
    """A fresh state directory that reuses the module's generated models."""
    (tmp_path / CACHE_DIR).parent.mkdir(parents=True)
    (tmp_path / CACHE_DIR).symlink_to(doctor_run.state / CACHE_DIR)
    return tmp_path


# --- this machine -----------------------------------------------------------------------------


def test_the_whole_run_exits_0_and_is_fast(doctor_run: Run) -> None:
    assert doctor_run.code == 0, doctor_run.err
    data = doctor_run.data
    assert data["ok"] is True and data["failed_types"] == []
    assert data["seconds"] < 60
    assert doctor_run.err == ""


def test_every_required_type_is_checked(doctor_run: Run) -> None:
    assert set(REQUIRED + TERNARY) <= set(doctor_run.data["types"])
    assert list(doctor_run.data["types"]) == list(TYPE_NAMES)


@pytest.mark.parametrize("type_name", TYPE_NAMES, ids=TYPE_NAMES)
def test_type_runs_on_this_machine(doctor_run: Run, type_name: str) -> None:
    row = doctor_run.data["types"][type_name]
    assert row["status"] == "ok", row
    assert row["ok"] is True and row["signal"] is None
    assert row["stage"] == "repacked kernels, batch 512"
    assert set(row["buffers"]) == {"plain", "repacked"}


@pytest.mark.parametrize("type_name", TYPE_NAMES, ids=TYPE_NAMES)
def test_generated_model_holds_exactly_that_type(doctor_run: Run, type_name: str) -> None:
    version = llama_cpp_version()
    assert version is not None
    path = cache_dir(doctor_run.state, version) / f"doctor-{type_name.lower()}.gguf"
    info = read_gguf_info(path)
    assert set(info.bytes_by_type) == {type_name, "F32"}  # F32: the 1-D norms only
    assert info.architecture == "llama"
    assert all(t.shape[0] % 256 == 0 for t in _tensors(path) if len(t.shape) == 2)


def _tensors(path: Path) -> list[Any]:
    import gguf

    return list(gguf.GGUFReader(path).tensors)


def test_json_shape_and_the_stored_file(doctor_run: Run) -> None:
    data = doctor_run.data
    build_id, record = current_build()
    assert data["build_id"] == build_id
    assert data["build"] == (dict(record) if record is not None else None)
    assert data["llama_cpp_version"] == llama_cpp_version()
    assert data["system_info"].startswith("CPU :")
    assert "SSE3" in data["cpu_features"] or "NEON" in data["cpu_features"]
    assert data["batch_sizes"][0] == 1 and data["batch_sizes"][-1] == 512
    assert data["test_hook"] is None
    row = data["types"]["Q4_0"]
    assert set(row) == {
        "type",
        "status",
        "ok",
        "seconds",
        "signal",
        "stage",
        "detail",
        "buffers",
        "checked_at",
    }
    stored = json.loads((doctor_run.state / DOCTOR_FILE).read_text())
    assert stored == data
    assert failed_types_for(doctor_run.state) == frozenset()


def test_human_table(state: Path) -> None:
    run = doctor(state, "--types", "q4_0,Q8_0")
    assert run.code == 0, run.err
    lines = run.out.splitlines()
    assert any("Q4_0" in ln and " ok " in ln for ln in lines)
    assert any("Q8_0" in ln and " ok " in ln for ln in lines)
    assert "2 of 2 types ok in" in run.out
    assert "llama.cpp CPU features:" in run.out


# --- failures ---------------------------------------------------------------------------------

SIGNALS = ["SIGILL", "SIGSEGV", "SIGBUS", "SIGABRT"]


@pytest.mark.parametrize("sig", SIGNALS, ids=SIGNALS)
def test_a_crashing_child_is_reported_by_its_signal(state: Path, sig: str) -> None:
    run = doctor(state, "--json", "--types", "Q4_0,Q8_0", env={TEST_CRASH_ENV: f"Q4_0={sig}"})
    assert run.code == 1
    data = run.data
    assert data["failed_types"] == ["Q4_0"]
    crashed = data["types"]["Q4_0"]
    assert (crashed["status"], crashed["signal"]) == ("crashed", sig)
    assert crashed["stage"] == "plain kernels, batch 1"
    assert data["types"]["Q8_0"]["status"] == "ok"
    assert data["test_hook"] == f"Q4_0={sig}"
    assert "Q4_0" in run.err and sig in run.err
    assert "EDGE_AGENT_LLAMA_PROFILE=" in run.err and "docs/operations.md" in run.err
    assert failed_types_for(state) == {"Q4_0"}


def test_a_hanging_child_is_a_timeout(state: Path) -> None:
    run = doctor(state, "--json", "--types", "TQ2_0", "--timeout", "4", env={TEST_CRASH_ENV: "TQ2_0=hang"})
    assert run.code == 1
    row = run.data["types"]["TQ2_0"]
    assert row["status"] == "timeout" and "4 s" in row["detail"]
    assert 4 <= row["seconds"] < 20


def test_the_table_names_the_signal(state: Path) -> None:
    run = doctor(state, "--types", "Q4_1", env={TEST_CRASH_ENV: "Q4_1=SIGILL"})
    assert run.code == 1
    assert any("Q4_1" in ln and "SIGILL" in ln for ln in run.out.splitlines())
    assert "TEST HOOK SET" in run.out
    assert run.err.startswith("edge-agent doctor: tensor types Q4_1 failed on this build (Q4_1 SIGILL at ")


UNKNOWN = [
    ("made-up", "Q9_0", "'Q9_0'"),
    ("lower-case-typo", "q4_0,q4k", "'q4k'"),
    ("empty", ",", "(none given)"),
]


@pytest.mark.parametrize(("text", "named"), [c[1:] for c in UNKNOWN], ids=[c[0] for c in UNKNOWN])
def test_an_unknown_type_is_a_usage_error_naming_it(state: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match="unknown tensor type") as caught:
        parse_types(text)
    assert named in str(caught.value)
    run = doctor(state, "--types", text)
    assert run.code == 2
    assert named in run.err and "known: F16, BF16" in run.err


def test_types_are_case_insensitive_and_in_table_order() -> None:
    assert parse_types("q8_0, f16,Q8_0") == ("F16", "Q8_0")
    assert parse_types(None) == TYPE_NAMES


# --- results across runs and builds -----------------------------------------------------------


def _report(build_id: str, **status: str) -> DoctorReport:
    results = tuple(
        TypeResult(name, "crashed" if s != "ok" else "ok", 0.1, signal=None if s == "ok" else s)  # type: ignore[arg-type]
        for name, s in status.items()
    )
    return DoctorReport(build_id, None, "0.3.36", None, results, 1.0)


def test_a_partial_run_keeps_the_other_types_of_the_same_build(tmp_path: Path) -> None:
    save_results(tmp_path, _report("b1", F16="ok", Q4_0="ok", Q8_0="ok"))
    data = save_results(tmp_path, _report("b1", Q4_0="SIGILL"))
    assert list(data["types"]) == ["F16", "Q8_0", "Q4_0"]
    assert data["failed_types"] == ["Q4_0"] and data["ok"] is False
    assert failed_types_for(tmp_path, "b1") == {"Q4_0"}
    save_results(tmp_path, _report("b1", Q4_0="ok"))
    assert failed_types_for(tmp_path, "b1") == frozenset()


def test_results_of_another_build_are_ignored_and_replaced(tmp_path: Path) -> None:
    save_results(tmp_path, _report("old", Q4_0="SIGILL", F16="ok"))
    assert failed_types_for(tmp_path, "new") == frozenset()
    data = save_results(tmp_path, _report("new", Q8_0="ok"))
    assert list(data["types"]) == ["Q8_0"]


def test_the_installed_build_is_what_counts(tmp_path: Path) -> None:
    build_id, _ = current_build()
    save_results(tmp_path, _report(build_id, Q4_0="SIGILL"))
    assert failed_types_for(tmp_path) == {"Q4_0"}
    save_results(tmp_path, _report("another-build", Q4_0="SIGILL"))
    assert failed_types_for(tmp_path) == frozenset()


STORED = [
    ("absent", None),
    ("not-json", b"{"),
    ("not-an-object", b"[]"),
    ("other-format", json.dumps({"format": 99, "types": {}}).encode()),
    ("too-large", b" " * (1 << 21)),
]


@pytest.mark.parametrize("content", [c[1] for c in STORED], ids=[c[0] for c in STORED])
def test_unreadable_results_are_no_results(tmp_path: Path, content: bytes | None) -> None:
    if content is not None:
        (tmp_path / DOCTOR_FILE).write_bytes(content)
    assert load_results(tmp_path) is None
    assert failed_types_for(tmp_path, "any") == frozenset()


# --- how a child ended (pure) -----------------------------------------------------------------


def _lines(*events: dict[str, Any]) -> str:
    return "".join("DOCTOR " + json.dumps(e) + "\n" for e in events)


DONE = _lines({"event": "stage", "stage": "repacked kernels, batch 512"}, {"event": "done"})
STAGE = _lines(
    {"event": "system_info", "text": "CPU : AVX2 = 1 |"},
    {"event": "stage", "stage": "plain kernels, batch 7"},
)
ENDINGS = [
    ("done", 0, DONE, "", False, ("ok", None)),
    ("exit-0-without-done", 0, STAGE, "", False, ("error", None)),
    ("sigill", -4, STAGE, "", False, ("crashed", "SIGILL")),
    ("sigsegv", -11, STAGE, "", False, ("crashed", "SIGSEGV")),
    ("sigbus", -7, STAGE, "", False, ("crashed", "SIGBUS")),
    ("sigabrt-after-an-assert", -6, STAGE, "GGML_ASSERT(x) failed\n", False, ("crashed", "SIGABRT")),
    ("killed", -9, STAGE, "", False, ("crashed", "SIGKILL")),
    (
        "error-line",
        3,
        STAGE + _lines({"event": "error", "message": "llama_decode returned 1"}),
        "",
        False,
        ("error", None),
    ),
    ("exit-1-traceback", 1, "", "Traceback ...\nImportError: no llama_cpp\n", False, ("error", None)),
    ("timeout", None, STAGE, "", True, ("timeout", None)),
    ("noise-on-stdout", 0, "hello\nDOCTOR {not json\n" + DONE, "", False, ("ok", None)),
]


@pytest.mark.parametrize(
    ("code", "out", "err", "timed_out", "expected"), [c[1:] for c in ENDINGS], ids=[c[0] for c in ENDINGS]
)
def test_how_a_child_ended(
    code: int | None, out: str, err: str, timed_out: bool, expected: tuple[str, str | None]
) -> None:
    result, info = interpret("Q4_0", code, out, err, 1.0, timed_out=timed_out, timeout_s=30)
    assert (result.status, result.signal) == expected
    assert result.ok == (expected[0] == "ok")
    if "system_info" in out:
        assert info == "CPU : AVX2 = 1 |"
        assert result.stage == "plain kernels, batch 7"
    if expected[0] == "error":
        assert result.detail  # always says why
    if err.startswith("GGML_ASSERT"):
        assert "GGML_ASSERT" in result.detail
