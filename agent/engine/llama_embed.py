"""Embeddings from a GGUF model through llama.cpp's pooling.

A separate llama context (``embeddings = true``) on the same loaded model, so embedding requests
never disturb the KV cache of the generation context. Pooling is the model's own (a GGUF
embedding model declares ``<arch>.pooling_type``); a generative model without one is pooled by
mean. For an embedding model, inputs are packed several to a batch (one sequence id each) up to
``n_batch`` tokens. A generative model is given one input per batch: with llama.cpp 0.3.36 a
short sequence packed next to a longer one in a causal (Gemma 3) embedding batch comes out
measurably different from the same text alone, and a vector must not depend on its neighbours.

Each batch is computed in an ``embed`` turn of the process's :class:`agent.engine.core_share.CoreShare`
(generation steps leave it its threads, or they alternate: ``engine.cpu_sharing``).

Invariants: one vector per input, in input order, L2-normalised; an input longer than ``n_batch``
tokens is refused with :class:`agent.errors.BadRequest` naming both numbers; the context's
memory is cleared before every batch, so inputs never attend to each other or to earlier calls.
Not thread-safe: the engine calls it from one dedicated thread.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.engine.core_share import CoreShare
from agent.engine.native import NativeContext, NativeModel
from agent.engine.vector_pooling import l2_normalize
from agent.errors import BadRequest, EngineError

__all__ = ["LlamaEmbedder", "pack_batches"]

LLAMA_POOLING_TYPE_MEAN = 1


def pack_batches(lengths: Sequence[int], n_batch: int, max_seqs: int) -> list[list[int]]:
    """Input indices grouped in order: at most ``n_batch`` tokens and ``max_seqs`` inputs a group."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and (used + n > n_batch or len(current) >= max_seqs):
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


class LlamaEmbedder:
    def __init__(
        self,
        model: NativeModel,
        *,
        n_batch: int,
        n_threads: int,
        max_seqs: int = 16,
        share: CoreShare | None = None,
    ) -> None:
        arch = model.meta("general.architecture") or ""
        declared = model.meta(f"{arch}.pooling_type")
        pooling = None if declared is not None else LLAMA_POOLING_TYPE_MEAN
        self._model = model
        self._share = share or CoreShare("off")
        self._n_batch = n_batch
        self._max_seqs = max_seqs if declared is not None else 1
        self.packs_inputs = self._max_seqs > 1
        self._ctx = NativeContext(
            model,
            n_ctx=n_batch,
            n_batch=n_batch,
            n_slots=max_seqs,
            n_threads=n_threads,
            embeddings=True,
            pooling=pooling,
        )
        self.dimension = model.n_embd

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """``(vectors, prompt tokens)`` for ``texts``."""
        tokenized = [self._model.tokenize(t, add_bos=self._model.add_bos, special=False) for t in texts]
        for i, toks in enumerate(tokenized):
            if not toks:
                raise BadRequest(f"input[{i}] is empty", param="input")
            if len(toks) > self._n_batch:
                raise BadRequest(
                    f"input[{i}] has {len(toks)} tokens; this model embeds at most {self._n_batch}",
                    param="input",
                )
        out: list[list[float]] = [[] for _ in texts]
        for group in pack_batches([len(t) for t in tokenized], self._n_batch, self._max_seqs):
            self._ctx.clear()
            tokens: list[int] = []
            seqs: list[int] = []
            for seq, index in enumerate(group):
                tokens.extend(tokenized[index])
                seqs.extend([seq] * len(tokenized[index]))
            with self._share.turn("embed"):
                status = self._ctx.encode(tokens, seqs)
            if status != 0:
                raise EngineError(f"llama.cpp embedding batch failed with status {status}")
            raw = [self._ctx.seq_embedding(seq) for seq in range(len(group))]
            for index, vec in zip(group, l2_normalize(raw).tolist(), strict=True):
                out[index] = vec
        return out, sum(len(t) for t in tokenized)

    def close(self) -> None:
        self._ctx.close()
