"""The backend protocol every inference engine implements, and its plain data types.

Invariants: an engine's ``generate`` and ``chat`` yield zero or more chunks with text and exactly
one final chunk whose ``finish_reason`` is set and which carries the usage counts; a consumer that
stops iterating (client gone) cancels the generation and frees its slot. ``embed`` returns one
L2-normalised vector per input, in input order. An engine that cannot do one of these (an
embedding model asked to chat, say) raises :class:`agent.errors.BadRequest` naming the model.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length", "cancelled", "error"]


class EngineState(enum.StrEnum):
    IDLE = "idle"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the API reports about a loaded or loadable model."""

    id: str
    path: Path
    format: Literal["gguf", "onnx"]
    task: Literal["completion", "chat", "embedding"] = "completion"
    n_ctx_train: int | None = None
    size_bytes: int = 0
    created: int = 0
    chat_template: str | None = None
    tokenizer_path: Path | None = None
    """ONNX models: the tokenizer.json shipped with the model (e.g. a second registry target)."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    """Report each sampled token's log probability and this many most likely alternatives
    (``None``: no log probabilities)."""
    grammar: str | None = None
    """A GBNF grammar (root rule ``root``) every sampled token must keep the text within: the
    text of a generation that ends by itself (not by ``max_tokens``) is a complete match."""


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    prompt: str
    max_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    request_id: str = ""
    deadline: float | None = None
    """Absolute ``time.monotonic()`` after which the generation stops with ``length``."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    """``system``, ``user``, ``assistant`` (or ``tool``)."""
    content: str


@dataclass(frozen=True, slots=True)
class ChatRequest:
    messages: tuple[ChatMessage, ...]
    max_tokens: int = 256
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    request_id: str = ""
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class Embeddings:
    """One vector per input (same order) and the tokens the inputs took."""

    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens taken from a KV cache (a slot's, another slot's, disk) instead of decoded."""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One sampled token: its bytes, its log probability, and the most likely alternatives.

    Log probabilities are the log-softmax of the model's logits for that position (logit bias
    included), before temperature, top-k/top-p, penalties or a grammar reshape them: the model's
    own distribution, as OpenAI reports it."""

    piece: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(frozen=True, slots=True)
class GenerationChunk:
    text: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    """The tokens sampled since the previous chunk (only when asked for)."""


@runtime_checkable
class Engine(Protocol):
    """A loaded (or loading) model that can generate text."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def state(self) -> EngineState: ...

    @property
    def queue_depth(self) -> int: ...

    async def load(self) -> None:
        """Load the model; raise :class:`agent.errors.ModelLoadError` on failure."""

    def count_tokens(self, text: str) -> int: ...

    def generate(self, request: CompletionRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the completion; raise :class:`agent.errors.RequestError` subclasses for refusals."""
        ...

    def chat(self, request: ChatRequest) -> AsyncIterator[GenerationChunk]:
        """Render the messages with the model's chat template, then stream like ``generate``."""
        ...

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        """Embed a batch of texts; raise :class:`agent.errors.BadRequest` if the model cannot."""
        ...

    async def close(self) -> None: ...


__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "Embeddings",
    "Engine",
    "EngineState",
    "FinishReason",
    "GenerationChunk",
    "ModelInfo",
    "SamplingParams",
    "TokenLogprob",
    "Usage",
]
