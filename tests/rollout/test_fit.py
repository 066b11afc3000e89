"""The hub's fit check on reported hardware: the box's own selection and memory estimate."""

from __future__ import annotations

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


def hw(available: int, disk: int = 100 * GIB, features: tuple[str, ...] = ("avx2",)) -> dict[str, object]:
    return {
        "cpu": {"arch": "x86_64", "features": list(features)},
        "memory": {"total_bytes": 16 * GIB, "available_bytes": available},
        "cgroup": {},
        "disk_free_bytes": disk,
    }


@pytest.mark.parametrize(
    ("hardware", "verdict", "reason"),
    [
        pytest.param(hw(8 * GIB), "fits", "needs", id="plenty-of-memory"),
        pytest.param(hw(300 << 20), "no", "available", id="too-little-memory"),
        pytest.param(hw(8 * GIB, disk=100 << 20), "no", "free on disk", id="too-little-disk"),
        pytest.param({}, "unknown", "no hardware", id="no-hardware-reported"),
    ],
)
def test_fit(hardware: dict[str, object], verdict: str, reason: str) -> None:
    f = fit("dev-a", hardware, MODEL)
    assert f.verdict == verdict and reason in f.reason, f
