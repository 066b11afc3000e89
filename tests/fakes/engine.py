"""A fake inference engine (the :class:`agent.engine.base.Engine` seam) for pool and server logic.

It "generates" the words of a fixed reply one chunk at a time, waiting on an optional gate so a
test can hold a stream in flight. Load failures and broken generations are switched on by the
constructor, so each test states the behaviour it needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.engine.base import CompletionRequest, EngineState, GenerationChunk, ModelInfo, Usage
from agent.engine.lifecycle import EngineLifecycle
from agent.errors import ModelLoadError, ModelNotReady


def fake_info(model_id: str, size_mb: int = 100, task: str = "completion") -> ModelInfo:
    return ModelInfo(
        id=model_id,
        path=Path(f"/models/{model_id}.gguf"),
        format="gguf",
        task=task,  # type: ignore[arg-type]
        size_bytes=size_mb << 20,
    )


@dataclass
class FakeBehaviour:
    fail_load: bool = False
    crash_load: bool = False
    """Raise a plain RuntimeError from load (an engine bug), not ModelLoadError."""
    finish_reason: str = "length"
    """What the final chunk says; ``error`` makes a smoke test fail."""
    produce_tokens: bool = True
    load_delay_s: float = 0.0
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    """Pause before each token after the first (a slow stream)."""


class FakeEngine(EngineLifecycle):
    """Implements the Engine protocol in memory."""

    def __init__(self, info: ModelInfo, behaviour: FakeBehaviour | None = None) -> None:
        super().__init__(info)
        self.behaviour = behaviour or FakeBehaviour()
        self.gate: asyncio.Event | None = None
        """When set, each chunk after the first waits for the event (holds a stream in flight)."""
        self.served: list[str] = []
        self.closed = False
        self.loads = 0

    async def load(self) -> None:
        self.loads += 1
        self._state = EngineState.LOADING
        if self.behaviour.load_delay_s:
            await asyncio.sleep(self.behaviour.load_delay_s)
        if self.behaviour.crash_load:
            raise RuntimeError("segfault averted by luck")
        if self.behaviour.fail_load:
            self._state = EngineState.FAILED
            raise ModelLoadError(f"cannot load {self._info.path}: not a GGUF file")
        self._state = EngineState.READY

    def count_tokens(self, text: str) -> int:
        return len(text.split()) + 1

    async def generate(self, request: CompletionRequest) -> AsyncIterator[GenerationChunk]:
        if self._state is not EngineState.READY:
            raise ModelNotReady(f"model {self._info.id} is {self._state.value}")
        self._running += 1
        try:
            self.served.append(request.request_id)
            if self.behaviour.first_token_delay_s:
                await asyncio.sleep(self.behaviour.first_token_delay_s)
            words = [f"{self._info.id}-{i}" for i in range(request.max_tokens)]
            if not self.behaviour.produce_tokens:
                words = []
            for i, word in enumerate(words):
                if i > 0 and self.gate is not None:
                    await self.gate.wait()
                if i > 0 and self.behaviour.token_delay_s:
                    await asyncio.sleep(self.behaviour.token_delay_s)
                yield GenerationChunk(text=word + " ")
            yield GenerationChunk(
                text="",
                finish_reason=self.behaviour.finish_reason,  # type: ignore[arg-type]
                usage=Usage(self.count_tokens(request.prompt), len(words)),
            )
        finally:
            self._running -= 1

    def chat(self, request: Any) -> AsyncIterator[GenerationChunk]:
        prompt = "\n".join(m.content for m in request.messages)
        return self.generate(CompletionRequest(prompt=prompt, max_tokens=request.max_tokens))

    async def embed(self, texts: Sequence[str]) -> Any:
        return type("Embeddings", (), {"vectors": [[1.0, 0.0] for _ in texts], "prompt_tokens": len(texts)})

    async def close(self) -> None:
        self.closed = True
        self._state = EngineState.IDLE


class FakeFactory:
    """Builds :class:`FakeEngine` objects; behaviours by model id; remembers what it built."""

    def __init__(self, behaviours: dict[str, FakeBehaviour] | None = None) -> None:
        self.behaviours = behaviours or {}
        self.built: list[FakeEngine] = []

    def __call__(self, info: ModelInfo) -> FakeEngine:
        engine = FakeEngine(info, self.behaviours.get(info.id))
        self.built.append(engine)
        return engine


__all__ = ["FakeBehaviour", "FakeEngine", "FakeFactory", "fake_info"]
