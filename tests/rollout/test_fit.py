"""The hub's fit check on reported hardware: the box's own selection and memory estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.fit.check import fit
from registry.metadata import ModelManifest

GIB = 1 << 30
MODEL = ModelManifest(
    id="m", version="2", family="llama", parameters=1_000_000_000, quantization="Q4_K_M", format="gguf",
    task="completion", file_name="model.gguf", file_size=700 << 20, sha256="0" * 64, chunk_size=700 << 20,
    chunk_sha256=("0" * 64,), n_layers=16, n_heads=32, n_kv_heads=8, embedding_length=2048,
    context_length=2048, vocab_size=32000,
)  # fmt: skip


def hw(
    available: int,
    disk: int = 100 * GIB,
    features: tuple[str, ...] = ("avx2",),
    doctor: dict[str, object] | None = None,
) -> dict[str, object]:
    out: dict[str, object] = {
        "cpu": {"arch": "x86_64", "features": list(features)},
        "memory": {"total_bytes": 16 * GIB, "available_bytes": available},
        "cgroup": {},
        "disk_free_bytes": disk,
    }
    if doctor is not None:
        out["doctor"] = doctor
    return out


def doctor(failed: list[str], current: bool = True) -> dict[str, object]:
    """The ``doctor`` table of a hardware report (agent/hardware/report.py)."""
    types = {"Q4_K": "ok", "Q8_0": "ok", **dict.fromkeys(failed, "SIGILL")}
    return {"build_id": "b1", "current": current, "types": types, "failed_types": failed}


@pytest.mark.parametrize(
    ("hardware", "verdict", "reason"),
    [
        pytest.param(hw(8 * GIB), "fits", "needs", id="plenty-of-memory"),
        pytest.param(hw(300 << 20), "no", "available", id="too-little-memory"),
        pytest.param(hw(8 * GIB, disk=100 << 20), "no", "free on disk", id="too-little-disk"),
        pytest.param({}, "unknown", "no hardware", id="no-hardware-reported"),
        pytest.param(hw(8 * GIB, doctor=doctor(["Q4_K"])), "no", "Q4_K failed", id="doctor-failed-its-type"),
        pytest.param(hw(8 * GIB, doctor=doctor(["Q8_0"])), "fits", "needs", id="doctor-failed-another-type"),
        pytest.param(
            hw(8 * GIB, doctor=doctor(["Q4_K"], current=False)), "fits", "needs", id="doctor-of-another-build"
        ),
    ],
)
def test_fit(hardware: dict[str, object], verdict: str, reason: str) -> None:
    f = fit("dev-a", hardware, MODEL)
    assert f.verdict == verdict and reason in f.reason, f


def test_hardware_report_carries_the_doctor_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The box reports the doctor's table; failures count only with the build installed now."""
    import json

    from agent.engine import doctor as doc
    from agent.hardware.report import doctor_table

    assert doctor_table(tmp_path) is None  # the doctor never ran here
    results = {
        "format": doc.FORMAT_VERSION,
        "build_id": "b1",
        "types": {"Q4_K": {"status": "crashed", "signal": "SIGILL"}, "Q8_0": {"status": "ok"}},
    }
    doc.results_path(tmp_path).write_text(json.dumps(results))
    monkeypatch.setattr(doc, "current_build", lambda: ("b1", None))
    table = doctor_table(tmp_path)
    assert table == {"build_id": "b1", "current": True, "types": {"Q4_K": "SIGILL", "Q8_0": "ok"},
                     "failed_types": ["Q4_K"]}  # fmt: skip
    monkeypatch.setattr(doc, "current_build", lambda: ("b2", None))
    table = doctor_table(tmp_path)
    assert table is not None and table["current"] is False and table["failed_types"] == []
