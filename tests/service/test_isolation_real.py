"""Crash isolation with real children and real llama.cpp: a trial that dies refuses the model, the
previous model keeps answering, and nothing is tried twice (agent/engine/isolation.py, agent/daemon/trial.py).

The crashes are real: the child process kills itself with the named signal after the model loaded
(``EDGE_AGENT_TEST_FAULT``, read only by the trial and the activation marker), exactly as a kernel
executing an instruction this CPU lacks would kill it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import Settings
from agent.daemon.app import build_isolation
from agent.daemon.catalog import info_for_file
from agent.engine.base import CompletionRequest, ModelInfo, SamplingParams
from agent.engine.factory import build_engine
from agent.engine.isolation import FAULT_ENV, ChildTrial, TrialOutcome
from agent.engine.pool import ModelPool, SwapFailed
from tests.selection.conftest import quantize_variant

pytestmark = [pytest.mark.model, pytest.mark.slow]


def _settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path, engine={"n_threads": 2, "n_ctx": 512})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fault", "crashed", "reason"),
    [
        pytest.param(None, False, "ok", id="passes"),
        pytest.param("sigill", True, "SIGILL", id="illegal-instruction"),
        pytest.param("sigsegv", True, "SIGSEGV", id="segmentation-fault"),
        pytest.param("abort", True, "SIGABRT", id="abort"),
        pytest.param("hang", True, "timeout", id="hangs"),
    ],
)
def test_the_child_trial_names_how_it_ended(
    tmp_path: Path,
    gemma_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: str | None,
    crashed: bool,
    reason: str,
) -> None:
    if fault is not None:
        monkeypatch.setenv(FAULT_ENV, f"trial:gemma:{fault}")
    settings = _settings(tmp_path)
    trial = ChildTrial(lambda: settings.model_dump(mode="json"))
    outcome = asyncio.run(trial(info_for_file(gemma_path, "gemma"), 8.0 if fault == "hang" else 120.0))
    assert (outcome.ok, outcome.crashed, outcome.reason) == (fault is None, crashed, reason)
    if fault is None:
        assert "smoke test and batch prefill passed" in outcome.detail


def test_a_broken_file_fails_cleanly_and_is_not_a_crash(tmp_path: Path, gemma_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gemma_path.read_bytes()[: 1 << 20])  # a truncated download
    settings = _settings(tmp_path)
    outcome = asyncio.run(ChildTrial(lambda: settings.model_dump(mode="json"))(info_for_file(broken), 120.0))
    assert (outcome.ok, outcome.crashed) == (False, False)
    assert outcome.detail


def test_a_crashing_model_is_refused_and_the_previous_one_keeps_answering(
    tmp_path: Path, gemma_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap to a legacy-quant variant whose trial dies by SIGILL is refused with that reason;
    the Q4_K_M default answers the next request; a second swap is refused without a second child."""
    q4_0 = quantize_variant(gemma_path, "Q4_0")
    settings = _settings(tmp_path)
    isolation = build_isolation(settings)
    assert isolation is not None
    trials: list[str] = []
    real = isolation._runner
    assert real is not None

    async def counting(info: ModelInfo, timeout_s: float) -> TrialOutcome:
        trials.append(info.id)
        return await real(info, timeout_s)

    isolation._runner = counting
    refusals: list[str] = []
    isolation.add_listener(lambda v: refusals.append(f"{v.model}:{v.reason}"))
    monkeypatch.setenv(FAULT_ENV, "trial:gemma-q4_0:sigill")

    async def main() -> None:
        pool = ModelPool(lambda info: build_engine(info, settings, isolation), settle_s=0.2)
        pool.register(info_for_file(gemma_path, "gemma-q4_k_m"))
        pool.start_loading()
        await pool.wait_loaded()
        for _ in range(2):
            with pytest.raises(SwapFailed) as err:
                await pool.swap(info_for_file(q4_0, "gemma-q4_0"))
            assert err.value.reason == "refused"
            assert "SIGILL" in str(err.value)
            assert pool.default_id == "gemma-q4_k_m"
            request = CompletionRequest(
                prompt="The capital of France is",
                max_tokens=4,
                sampling=SamplingParams(temperature=0.0, top_k=1),
            )
            chunks = [c async for c in pool.resolve(None).generate(request)]
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        await pool.close()

    asyncio.run(main())
    assert trials == ["gemma-q4_k_m", "gemma-q4_0"]  # each tried once; the refusal is remembered
    assert refusals == ["gemma-q4_0:SIGILL"]
    assert [(v.model, v.reason) for v in isolation.refused()] == [("gemma-q4_0", "SIGILL")]


def test_a_legacy_quant_runs_in_its_trial_on_this_cpu(tmp_path: Path, gemma_path: Path) -> None:
    """Q4_0 and Q8_0 (the types ggml's AMX kernels handle) pass their trial here, whatever the CPU."""
    settings = _settings(tmp_path)
    trial = ChildTrial(lambda: settings.model_dump(mode="json"))
    for quant in ("Q4_0", "Q8_0"):
        outcome = asyncio.run(trial(info_for_file(quantize_variant(gemma_path, quant), quant), 120.0))
        assert (outcome.ok, outcome.reason) == (True, "ok"), outcome.detail
