"""The scheduled re-probe against a real model pool: real Gemma variants, real hot swaps."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from agent.config import EngineSettings, SelectionSettings, Settings
from agent.daemon.candidates import model_memory_estimate
from agent.daemon.catalog import info_for_file
from agent.daemon.reselect import Reselector
from agent.engine.base import CompletionRequest, SamplingParams
from agent.engine.factory import build_engine
from agent.engine.pool import ModelPool
from agent.hardware.probe import probe
from fleet.hardware import HardwareProfile
from fleet.memory import MIB

MACHINES = Path(__file__).resolve().parent.parent / "fixtures" / "machines"


def replay(root: Path) -> HardwareProfile:
    return probe(root, gpus=lambda: (), onnx_providers=lambda: ())


def squeezed_container(tmp: Path, usable: int) -> Path:
    """The 1 GiB container snapshot with its working set raised so that ``usable`` bytes remain."""
    root = tmp / "container"
    shutil.copytree(MACHINES / "container-1g", root)
    (root / "sys/fs/cgroup/memory.current").write_text(f"{(1 << 30) - usable}\n")
    (root / "sys/fs/cgroup/memory.stat").write_text("anon 0\nfile 0\ninactive_file 0\n")
    return root


@pytest.mark.model
@pytest.mark.slow
def test_reprobe_moves_up_when_roomy_and_down_under_sustained_pressure(
    tmp_path: Path, gemma_variants: dict[str, Path]
) -> None:
    settings = Settings(
        state_dir=tmp_path / "state",
        engine=EngineSettings(n_threads=2, n_ctx=512, n_parallel=1, batch_invariant=True),
        selection=SelectionSettings(up_after=1, down_after=2, min_switch_interval_s=0, speed_floor_tps=0),
    )
    small = info_for_file(gemma_variants["Q4_0"], "gemma-q4_0")
    large = info_for_file(gemma_variants["Q8_0"], "gemma-q8_0")
    estimate = model_memory_estimate(settings)
    headroom = settings.selection.headroom_mb * MIB
    # Pressure (usable < headroom) where, with the serving Q8_0's memory given back, Q4_0 fits and
    # Q8_0 does not: usable + est(Q8_0) - headroom lies between est(Q4_0) and est(Q8_0).
    usable = headroom - (estimate(large) - estimate(small)) // 2
    profiles = {"now": replay(MACHINES / "rpi5-8gb")}

    async def scenario() -> None:
        pool = ModelPool(lambda info: build_engine(info, settings), estimate=estimate)
        pool.add(build_engine(small, settings))
        pool.register(large)
        reselector = Reselector(settings, pool, probe_fn=lambda: profiles["now"])
        try:
            pool.start_loading()
            await pool.wait_loaded()
            assert pool.default_id == "gemma-q4_0"

            first = await reselector.tick()  # roomy and calm: up to the higher-precision variant
            assert first is not None and first.switch and first.target == "gemma-q8_0", first
            assert pool.default_id == "gemma-q8_0"

            profiles["now"] = replay(squeezed_container(tmp_path, usable))
            second = await reselector.tick()  # one stressed probe is not enough
            assert second is not None and not second.switch and pool.default_id == "gemma-q8_0", second

            engine = pool.resolve(None)
            request = CompletionRequest(
                prompt="Edge computing is", max_tokens=24, sampling=SamplingParams(temperature=0.0, top_k=1)
            )

            async def generate() -> str | None:
                final = None
                async for chunk in engine.generate(request):
                    final = chunk.finish_reason or final
                return final

            in_flight = asyncio.create_task(generate())
            await asyncio.sleep(0)
            third = await reselector.tick()  # sustained: down to the smaller variant
            assert third is not None and third.switch and third.target == "gemma-q4_0", third
            assert pool.default_id == "gemma-q4_0"
            assert await in_flight == "length"  # the request on the old model was not dropped
        finally:
            await pool.close()

    asyncio.run(scenario())


def test_a_failing_probe_never_raises(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    pool = ModelPool()

    def broken() -> HardwareProfile:
        raise OSError("sysfs went away")

    assert asyncio.run(Reselector(settings, pool, probe_fn=broken).tick()) is None


@pytest.mark.model
@pytest.mark.slow
def test_sustained_throttling_steps_down_although_memory_is_plentiful(
    tmp_path: Path, gemma_variants: dict[str, Path]
) -> None:
    settings = Settings(
        state_dir=tmp_path / "state",
        engine=EngineSettings(n_threads=2, n_ctx=512, n_parallel=1, batch_invariant=True),
        selection=SelectionSettings(down_after=2, speed_floor_tps=0),
    )
    small = info_for_file(gemma_variants["Q4_0"], "gemma-q4_0")
    large = info_for_file(gemma_variants["Q8_0"], "gemma-q8_0")
    throttled = replay(MACHINES / "rpi4-4gb")  # firmware reports throttling now; 3 GiB free
    assert throttled.throttled is True

    async def scenario() -> None:
        pool = ModelPool(lambda info: build_engine(info, settings), estimate=model_memory_estimate(settings))
        pool.add(build_engine(large, settings))
        pool.register(small)
        reselector = Reselector(settings, pool, probe_fn=lambda: throttled)
        try:
            pool.start_loading()
            await pool.wait_loaded()
            first = await reselector.tick()
            assert first is not None and not first.switch and pool.default_id == "gemma-q8_0", first
            second = await reselector.tick()
            assert second is not None and second.switch and second.target == "gemma-q4_0", second
            assert pool.default_id == "gemma-q4_0"
        finally:
            await pool.close()

    asyncio.run(scenario())
