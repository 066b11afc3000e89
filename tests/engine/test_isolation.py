"""Crash isolation's rules (agent/engine/isolation.py) with a fake trial: verdicts, keys, markers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agent.engine.base import ModelInfo
from agent.engine.isolation import Isolation, TrialOutcome, file_sha256, inject_fault, signal_reason
from agent.errors import ModelLoadError, ModelRefused
from tests.fakes.trial import FakeTrial


def model(tmp_path: Path, model_id: str = "m", content: bytes = b"GGUF weights") -> ModelInfo:
    path = tmp_path / f"{model_id}.gguf"
    path.write_bytes(content)
    return ModelInfo(model_id, path, "gguf", size_bytes=len(content))


def isolation(
    tmp_path: Path, trial: FakeTrial | None, *, build: str = "b1", fingerprint: str = "f1"
) -> Isolation:
    return Isolation(
        tmp_path / "isolation",
        build=build,
        fingerprint=lambda info: fingerprint,
        runner=trial,
        clock=lambda: 1000.0,
    )


CRASHES = [
    pytest.param(TrialOutcome(False, "SIGILL", "died by SIGILL", crashed=True), "SIGILL", id="sigill"),
    pytest.param(TrialOutcome(False, "SIGSEGV", "died by SIGSEGV", crashed=True), "SIGSEGV", id="sigsegv"),
    pytest.param(TrialOutcome(False, "SIGKILL", "died by SIGKILL", crashed=True), "SIGKILL", id="oom-killer"),
    pytest.param(TrialOutcome(False, "timeout", "took longer", crashed=True), "timeout", id="timeout"),
]


@pytest.mark.parametrize(("outcome", "reason"), CRASHES)
def test_a_crashed_trial_refuses_the_model_and_is_remembered(
    tmp_path: Path, outcome: TrialOutcome, reason: str
) -> None:
    info = model(tmp_path)
    trial = FakeTrial({"m": outcome})
    iso = isolation(tmp_path, trial)
    with pytest.raises(ModelRefused) as err:
        asyncio.run(iso.admit(info))
    assert err.value.reason == reason
    assert reason in str(err.value)
    # across a restart (a new Isolation on the same directory): refused at once, no second trial
    again = isolation(tmp_path, trial)
    with pytest.raises(ModelRefused):
        asyncio.run(again.admit(info))
    assert trial.calls["m"] == 1
    [verdict] = again.refused()
    assert (verdict.model, verdict.reason, verdict.sha256) == ("m", reason, file_sha256(info.path))


def test_a_passed_trial_is_remembered(tmp_path: Path) -> None:
    info, trial = model(tmp_path), FakeTrial()
    asyncio.run(isolation(tmp_path, trial).admit(info))
    asyncio.run(isolation(tmp_path, trial).admit(info))
    assert trial.calls["m"] == 1
    assert isolation(tmp_path, trial).refused() == []


def test_a_clean_failure_is_a_load_error_and_not_remembered(tmp_path: Path) -> None:
    info = model(tmp_path)
    trial = FakeTrial({"m": TrialOutcome(False, "failed", "ModelLoadError: not a GGUF file")})
    iso = isolation(tmp_path, trial)
    for _ in range(2):
        with pytest.raises(ModelLoadError, match="not a GGUF file") as err:
            asyncio.run(iso.admit(info))
        assert not isinstance(err.value, ModelRefused)
    assert trial.calls["m"] == 2


@pytest.mark.parametrize(
    "change",
    [
        pytest.param("build", id="another-llama-build"),
        pytest.param("settings", id="other-engine-settings"),
        pytest.param("file", id="another-file-content"),
    ],
)
def test_a_refusal_holds_only_for_its_file_settings_and_build(tmp_path: Path, change: str) -> None:
    info = model(tmp_path)
    crash = FakeTrial({"m": TrialOutcome(False, "SIGILL", "x", crashed=True)})
    with pytest.raises(ModelRefused):
        asyncio.run(isolation(tmp_path, crash).admit(info))
    trial = FakeTrial()
    kwargs = {"build": "b2"} if change == "build" else {"fingerprint": "f2"} if change == "settings" else {}
    if change == "file":
        info = model(tmp_path, content=b"GGUF other weights")
    asyncio.run(isolation(tmp_path, trial, **kwargs).admit(info))
    assert trial.calls["m"] == 1


def test_forget_lets_a_refused_model_be_tried_again(tmp_path: Path) -> None:
    info = model(tmp_path)
    iso = isolation(tmp_path, FakeTrial({"m": TrialOutcome(False, "SIGILL", "x", crashed=True)}))
    with pytest.raises(ModelRefused):
        asyncio.run(iso.admit(info))
    assert iso.forget("other") == 0
    assert iso.forget("m") == 1
    trial = FakeTrial()
    asyncio.run(isolation(tmp_path, trial).admit(info))
    assert trial.calls["m"] == 1


def test_two_ids_of_one_file_share_one_trial(tmp_path: Path) -> None:
    a = model(tmp_path, "a")
    b = ModelInfo("b", a.path, "gguf")
    gate = asyncio.Event()

    class Slow(FakeTrial):
        async def __call__(self, info: ModelInfo, timeout_s: float) -> TrialOutcome:
            self.calls[info.id] += 1
            await gate.wait()
            return TrialOutcome(True, "ok", "")

    trial = Slow()
    iso = isolation(tmp_path, trial)

    async def both() -> None:
        tasks = [asyncio.create_task(iso.admit(a)), asyncio.create_task(iso.admit(b))]
        await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(both())
    assert sum(trial.calls.values()) == 1


def test_the_marker_exists_only_during_the_load(tmp_path: Path) -> None:
    info = model(tmp_path)
    iso = isolation(tmp_path, FakeTrial())
    markers = tmp_path / "isolation" / "activating"
    with iso.activating(info):
        [marker] = markers.glob("*.json")
        assert json.loads(marker.read_text())["model"] == "m"
    assert list(markers.glob("*.json")) == []
    with pytest.raises(RuntimeError), iso.activating(info):
        raise RuntimeError("a clean load failure")
    assert list(markers.glob("*.json")) == []
    assert iso.recover() == []


def test_a_marker_left_by_a_dead_daemon_refuses_the_model_at_the_next_start(tmp_path: Path) -> None:
    info = model(tmp_path)
    trial = FakeTrial()
    iso = isolation(tmp_path, trial)
    asyncio.run(iso.admit(info))  # its trial passed
    cm = iso.activating(info)
    cm.__enter__()  # the daemon dies inside the load: the context is never left
    restarted = isolation(tmp_path, trial)
    [verdict] = restarted.recover()
    assert (verdict.model, verdict.reason) == ("m", "daemon_died")
    assert "died while activating" in verdict.detail
    with pytest.raises(ModelRefused, match="daemon_died"):
        asyncio.run(restarted.admit(info))
    assert restarted.recover() == []  # the marker became the verdict, once
    assert trial.calls["m"] == 1


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"{not json", id="torn"),
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param(b'{"k": {"model": "m"}}', id="missing-fields"),
    ],
)
def test_an_unreadable_verdict_file_means_every_model_is_tried_again(tmp_path: Path, content: bytes) -> None:
    info = model(tmp_path)
    (tmp_path / "isolation").mkdir()
    (tmp_path / "isolation" / "verdicts.json").write_bytes(content)
    trial = FakeTrial()
    asyncio.run(isolation(tmp_path, trial).admit(info))
    assert trial.calls["m"] == 1


def test_listeners_hear_each_refusal_once(tmp_path: Path) -> None:
    info = model(tmp_path)
    iso = isolation(tmp_path, FakeTrial({"m": TrialOutcome(False, "SIGBUS", "x", crashed=True)}))
    heard: list[str] = []
    iso.add_listener(lambda v: heard.append(v.reason))
    for _ in range(2):
        with pytest.raises(ModelRefused):
            asyncio.run(iso.admit(info))
    assert heard == ["SIGBUS"]


def test_a_store_blob_is_not_hashed_again(tmp_path: Path) -> None:
    blob = tmp_path / "sha256" / ("ab" * 32)
    blob.parent.mkdir()
    blob.write_bytes(b"anything")
    assert file_sha256(blob) == "ab" * 32


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        pytest.param(-4, "SIGILL", id="sigill"),
        pytest.param(-6, "SIGABRT", id="sigabrt"),
        pytest.param(-9, "SIGKILL", id="sigkill"),
        pytest.param(-7, "SIGBUS", id="sigbus"),
        pytest.param(3, "exit 3", id="exit-status"),
    ],
)
def test_signal_names(code: int, reason: str) -> None:
    assert signal_reason(code) == reason


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param("", id="unset"),
        pytest.param("trial:other:abort", id="another-model"),
        pytest.param("activate:m:abort", id="another-stage"),
    ],
)
def test_a_fault_fires_only_for_its_stage_and_model(spec: str) -> None:
    inject_fault("trial", "m", {"EDGE_AGENT_TEST_FAULT": spec})


def test_an_unknown_fault_action_is_named() -> None:
    with pytest.raises(ValueError, match="'explode'"):
        inject_fault("trial", "m", {"EDGE_AGENT_TEST_FAULT": "trial:m:explode"})
