"""The llama.cpp engine in process with the real Gemma 3 270M: native samplers and refusals."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent.engine.base import ChatMessage, ChatRequest, CompletionRequest, ModelInfo, SamplingParams
from agent.engine.llama import LlamaEngine
from agent.errors import BadRequest, ContextOverflow, ModelLoadError, ModelNotReady

pytestmark = pytest.mark.model


def with_engine(path: Path, fn: Callable[[LlamaEngine], Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        kw.setdefault("n_ctx", 512)
        engine = LlamaEngine(ModelInfo(id="gemma", path=path, format="gguf"), n_threads=2, **kw)
        try:
            await engine.load()
            return await fn(engine)
        finally:
            await engine.close()

    return asyncio.run(main())


async def complete(engine: LlamaEngine, prompt: str, n: int, **sampling: Any) -> str:
    req = CompletionRequest(prompt=prompt, max_tokens=n, sampling=SamplingParams(**sampling))
    return "".join([c.text async for c in engine.generate(req)])


def test_logit_bias_bans_the_greedy_choice(gemma_path: Path) -> None:
    async def main(engine: LlamaEngine) -> None:
        first = await complete(engine, "The capital of France is", 1, temperature=0)
        banned = engine.tokenize(first)
        assert len(banned) == 1
        other = await complete(
            engine, "The capital of France is", 1, temperature=0, logit_bias={banned[0]: -100}
        )
        assert other and other != first

    with_engine(gemma_path, main)


def test_repeat_penalty_changes_a_repetitive_continuation(gemma_path: Path) -> None:
    async def main(engine: LlamaEngine) -> None:
        prompt = "yes yes yes yes yes yes yes yes"
        plain = await complete(engine, prompt, 12, temperature=0)
        penalised = await complete(
            engine, prompt, 12, temperature=0, repeat_penalty=1.8, presence_penalty=1.0
        )
        assert penalised != plain

    with_engine(gemma_path, main)


def test_full_sampler_chain_with_seed_is_repeatable(gemma_path: Path) -> None:
    async def main(engine: LlamaEngine) -> None:
        kw = {
            "temperature": 0.9,
            "top_k": 20,
            "top_p": 0.9,
            "min_p": 0.02,
            "seed": 7,
            "frequency_penalty": 0.5,
        }
        a = await complete(engine, "In the morning I", 16, **kw)
        b = await complete(engine, "In the morning I", 16, **kw)
        assert a == b and a

    with_engine(gemma_path, main)


def test_refusals_before_the_first_chunk(gemma_path: Path) -> None:
    async def main(engine: LlamaEngine) -> None:
        with pytest.raises(ContextOverflow, match="exceeds the context of 512 tokens"):
            await complete(engine, "hello", 600)
        with pytest.raises(BadRequest, match="at least one message"):
            await anext(aiter(engine.chat(ChatRequest(messages=()))))
        msgs = (ChatMessage("assistant", "first"),)
        with pytest.raises(BadRequest, match="alternate"):
            await anext(aiter(engine.chat(ChatRequest(messages=msgs))))

    with_engine(gemma_path, main)


def test_gemma_without_a_template_uses_the_documented_fallback(gemma_path: Path) -> None:
    async def main(engine: LlamaEngine) -> None:
        assert engine.chat_template is not None
        assert engine.chat_template.source == "fallback:gemma"
        prompt = engine.render_prompt(ChatRequest(messages=(ChatMessage("user", "Hi"),)))
        assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"

    with_engine(gemma_path, main)


def test_manifest_template_wins_over_the_fallback(gemma_path: Path) -> None:
    async def main() -> None:
        info = ModelInfo(
            id="g", path=gemma_path, format="gguf", chat_template="Q: {{ messages[-1].content }}\nA:"
        )
        engine = LlamaEngine(info, n_ctx=256, n_threads=2)
        try:
            with pytest.raises(ModelNotReady):
                engine.count_tokens("x")
            await engine.load()
            assert engine.render_prompt(ChatRequest(messages=(ChatMessage("user", "Hi"),))) == "Q: Hi\nA:"
        finally:
            await engine.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(None, id="missing-file"),
        pytest.param(b"", id="empty-file"),
        pytest.param(b"GGUF" + b"\x00" * 60, id="truncated-gguf"),
        pytest.param(b"not a model at all" * 10, id="not-gguf"),
    ],
)
def test_bad_model_files_fail_to_load_with_model_load_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "bad.gguf"
    if content is not None:
        path.write_bytes(content)

    async def main() -> None:
        engine = LlamaEngine(ModelInfo(id="bad", path=path, format="gguf"), n_ctx=256, n_threads=1)
        with pytest.raises(ModelLoadError, match=r"bad\.gguf"):
            await engine.load()
        assert engine.state.value == "failed"
        await engine.close()

    asyncio.run(main())


CROSS_SLOT_PREFIX = "Notes on the history of computing and its machines. " * 40


@pytest.mark.parametrize(
    ("batch_invariant", "n_parallel"),
    [
        pytest.param(True, 2, id="batch-invariant-2-slots"),
        pytest.param(False, 2, id="fast-2-slots"),
    ],
)
def test_prefix_copied_from_a_busy_slot_gives_the_cold_output(
    gemma_path: Path, batch_invariant: bool, n_parallel: int
) -> None:
    """B runs cold; A takes B's slot; B again, while A generates, copies A's cells of the shared
    prefix into the other slot (llama_memory_seq_cp across KV streams) and must answer as cold."""
    a_prompt = CROSS_SLOT_PREFIX + "In summary, the first computers"
    b_prompt = CROSS_SLOT_PREFIX + "The most important invention was"

    async def main(engine: LlamaEngine) -> None:
        runner = engine.runner
        assert runner is not None
        cold = await complete(engine, b_prompt, 12, temperature=0)
        a = asyncio.ensure_future(complete(engine, a_prompt, 48, temperature=0))
        while runner.stats.generated_tokens < 14:  # A is generating in the slot B used
            await asyncio.sleep(0.01)
        copied_before = runner.stats.copied_tokens
        again = await complete(engine, b_prompt, 12, temperature=0)
        await a
        shared = len(engine.tokenize(CROSS_SLOT_PREFIX, add_bos=True))
        copied = runner.stats.copied_tokens - copied_before
        assert copied >= shared - (256 if batch_invariant else 2)
        if batch_invariant:
            assert copied % 256 == 0
            assert again == cold

    with_engine(gemma_path, main, batch_invariant=batch_invariant, n_parallel=n_parallel, n_ctx=1024)


SYSTEM = "You are the assistant of a maintenance team. Rules: " + " ".join(
    f"Rule {i}: report the state of machine {i} before and after each repair." for i in range(30)
)


@pytest.mark.parametrize(
    ("first_kw", "second_kw", "files", "loaded"),
    [
        pytest.param({}, {}, 1, True, id="fast-restart"),
        pytest.param(
            {"batch_invariant": True}, {"batch_invariant": True}, 1, True, id="batch-invariant-restart"
        ),
        pytest.param({}, {"n_ctx": 2048}, 1, False, id="other-settings-refused"),
        pytest.param({}, {"prefill_chunk": 128}, 1, False, id="other-chunking-refused"),
        pytest.param({"batch_invariant": True}, {}, 1, False, id="other-mode-refused"),
    ],
)
def test_disk_prompt_cache_across_a_restart(
    gemma_path: Path,
    tmp_path: Path,
    first_kw: dict[str, Any],
    second_kw: dict[str, Any],
    files: int,
    loaded: bool,
) -> None:
    """A long system prompt seen twice is saved by one engine and loaded by the next one (same
    model file, same settings) instead of being decoded; with other settings it is not. In
    batch-invariant mode the answer after the load equals the one before the restart."""
    q1, q2 = SYSTEM + "\nQuestion: what comes first?", SYSTEM + "\nQuestion: what about machine 7?"
    kw = {"prompt_cache_dir": tmp_path, "prompt_cache_min_tokens": 256, "n_ctx": 1024}

    async def first(engine: LlamaEngine) -> str:
        await complete(engine, SYSTEM + "\nQuestion: and the last?", 4, temperature=0)
        await complete(engine, q1, 4, temperature=0)  # the system prompt seen twice: saved
        return await complete(engine, q2, 12, temperature=0)

    async def second(engine: LlamaEngine) -> tuple[str, int, int]:
        text = await complete(engine, q2, 12, temperature=0)
        assert engine.runner is not None
        return text, engine.runner.stats.disk_tokens, len(engine.tokenize(SYSTEM, add_bos=True))

    invariant = second_kw.get("batch_invariant", False)
    warm = with_engine(gemma_path, first, **{"batch_invariant": False, **kw, **first_kw})
    assert len(list(tmp_path.glob("*.kv"))) == files
    text, from_disk, shared = with_engine(gemma_path, second, **{"batch_invariant": False, **kw, **second_kw})
    if not loaded:
        assert from_disk == 0
        return
    assert from_disk >= (shared // 256 * 256 if invariant else shared)
    if invariant:
        assert text == warm
