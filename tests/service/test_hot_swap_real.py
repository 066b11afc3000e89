"""Hot swap between two real GGUF files (Gemma 3 270M Q4_K_M -> Q4_0) with llama.cpp engines."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.config import Settings
from agent.daemon.catalog import info_for_file
from agent.engine.base import CompletionRequest, EngineState, GenerationChunk, SamplingParams
from agent.engine.factory import build_engine
from agent.engine.pool import ModelPool, SwapFailed
from tests.selection.conftest import quantize_variant

pytestmark = [pytest.mark.model, pytest.mark.slow]


def _settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path, engine={"n_threads": 2, "n_ctx": 512})  # type: ignore[arg-type]


def _request(rid: str, max_tokens: int) -> CompletionRequest:
    return CompletionRequest(
        prompt="Once upon a time",
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=0.0, top_k=1, seed=1),
        request_id=rid,
    )


async def _drain(chunks: list[GenerationChunk], stream: object) -> list[GenerationChunk]:
    async for chunk in stream:  # type: ignore[attr-defined]
        chunks.append(chunk)
    return chunks


def test_stream_in_flight_finishes_on_old_model_while_new_requests_use_the_new_one(
    tmp_path: Path, gemma_path: Path
) -> None:
    q4_0 = quantize_variant(gemma_path, "Q4_0")
    settings = _settings(tmp_path)

    async def main() -> None:
        pool = ModelPool(lambda info: build_engine(info, settings), settle_s=0.2)
        pool.register(info_for_file(gemma_path, "gemma-q4_k_m"))
        pool.start_loading()
        await pool.wait_loaded()
        old = pool.resolve(None)
        assert old.state is EngineState.READY
        stream = old.generate(_request("in-flight", 48))
        chunks = [await anext(stream)]
        consumer = asyncio.create_task(_drain(chunks, stream))

        result = await pool.swap(info_for_file(q4_0, "gemma-q4_0"))
        assert (result.previous, result.current) == ("gemma-q4_k_m", "gemma-q4_0")
        assert not consumer.done()  # the old stream is still running after the swap
        new = pool.resolve(None)
        assert new.info.id == "gemma-q4_0" and new is not old
        answer = [c async for c in new.generate(_request("after-swap", 8))]
        assert answer[-1].finish_reason == "length" and answer[-1].usage is not None
        assert answer[-1].usage.completion_tokens == 8

        done = await asyncio.wait_for(consumer, 120)
        assert done[-1].finish_reason == "length"
        assert done[-1].usage is not None and done[-1].usage.completion_tokens == 48
        await pool.wait_retired()
        assert [(s.id, s.state) for s in pool.status()] == [
            ("gemma-q4_0", "ready"),
            ("gemma-q4_k_m", "unloaded"),
        ]
        assert pool.swaps["ok"] == 1
        await pool.close()

    asyncio.run(main())


def test_broken_new_model_rolls_back_to_the_serving_one(tmp_path: Path, gemma_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    with gemma_path.open("rb") as src:
        broken.write_bytes(src.read(1 << 20))  # a real GGUF header, truncated weights
    settings = _settings(tmp_path)

    async def main() -> None:
        pool = ModelPool(lambda info: build_engine(info, settings))
        pool.register(info_for_file(gemma_path, "gemma"))
        pool.start_loading()
        await pool.wait_loaded()
        serving = pool.resolve(None)
        with pytest.raises(SwapFailed, match=r"load_failed.*still serving 'gemma'") as failed:
            await pool.swap(info_for_file(broken, "broken"))
        assert failed.value.reason == "load_failed"
        assert pool.resolve(None) is serving and pool.default_id == "gemma"
        answer = [c async for c in serving.generate(_request("still-serving", 4))]
        assert answer[-1].usage is not None and answer[-1].usage.completion_tokens == 4
        assert pool.swaps == {"load_failed": 1}
        await pool.close()

    asyncio.run(main())


def test_cold_swap_on_a_box_that_holds_one_model(tmp_path: Path, gemma_path: Path) -> None:
    """A 300 MiB budget holds one Gemma (Q4_K_M 241 MiB, Q4_0 230 MiB): the swap replaces it."""
    q4_0 = quantize_variant(gemma_path, "Q4_0")
    settings = _settings(tmp_path)

    async def main() -> None:
        pool = ModelPool(lambda info: build_engine(info, settings), memory_budget=300 << 20, settle_s=0.2)
        pool.register(info_for_file(gemma_path, "gemma-q4_k_m"))
        pool.start_loading()
        await pool.wait_loaded()
        old = pool.resolve(None)
        stream = old.generate(_request("in-flight", 24))
        chunks = [await anext(stream)]
        consumer = asyncio.create_task(_drain(chunks, stream))
        result = await pool.swap(info_for_file(q4_0, "gemma-q4_0"))
        done = await asyncio.wait_for(consumer, 120)  # finished on the old model before it went
        assert done[-1].usage is not None and done[-1].usage.completion_tokens == 24
        assert (result.previous, result.current) == ("gemma-q4_k_m", "gemma-q4_0")
        assert old.state is EngineState.IDLE  # closed
        answer = [c async for c in pool.resolve(None).generate(_request("after-swap", 8))]
        assert answer[-1].usage is not None and answer[-1].usage.completion_tokens == 8
        assert pool.swaps == {"cold": 1, "ok": 1}
        assert pool.memory_used() == q4_0.stat().st_size
        await pool.close()

    asyncio.run(main())


def test_failed_cold_swap_brings_the_previous_model_back(tmp_path: Path, gemma_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    with gemma_path.open("rb") as src:
        broken.write_bytes(src.read(200 << 20))  # a real GGUF header, truncated weights, 200 MiB
    settings = _settings(tmp_path)

    async def main() -> None:
        pool = ModelPool(lambda info: build_engine(info, settings), memory_budget=300 << 20)
        pool.register(info_for_file(gemma_path, "gemma"))
        pool.start_loading()
        await pool.wait_loaded()
        before = "".join([c.text async for c in pool.resolve(None).generate(_request("before", 8))])
        with pytest.raises(SwapFailed, match=r"load_failed.*still serving 'gemma'"):
            await pool.swap(info_for_file(broken, "broken"))
        again = pool.resolve(None)
        assert again.info.id == "gemma" and again.state is EngineState.READY
        after = "".join([c.text async for c in again.generate(_request("after", 8))])
        assert after == before and after  # the same model, the same greedy continuation
        assert pool.swaps == {"cold": 1, "load_failed": 1}
        await pool.close()

    asyncio.run(main())
