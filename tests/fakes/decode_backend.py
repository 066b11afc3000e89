"""A fake llama context (the :class:`agent.engine.batching.DecodeBackend` seam) for scheduler tests.

A toy language model whose next token is a pure function of the sequence's whole KV history, so
anything the scheduler gets wrong (a position out of order, a token lost from the cache, logits
read from the wrong batch row, a cache reused across sequences) changes the output. It enforces
llama.cpp's rules: positions of a sequence must continue its cache exactly, a batch holds at most
``n_batch`` tokens, the cache holds at most ``n_ctx`` cells, and only rows marked for logits can be
sampled. Every batch is recorded, and ``gate`` lets a test release decode steps one at a time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from agent.engine.base import SamplingParams

EOG = 0
VOCAB = 97


def next_token(history: Sequence[int]) -> int:
    """The toy model: deterministic in the full history; EOG now and then."""
    h = 7
    for t in history:
        h = (h * 31 + t) % 1_000_003
    return h % VOCAB


def piece_of(token: int) -> bytes:
    return bytes([ord("a") + token % 26])


@dataclass
class Batch:
    tokens: list[int]
    positions: list[int]
    seqs: list[int]
    logits: list[bool]


@dataclass
class FakeSampler:
    backend: FakeDecodeBackend
    params: SamplingParams
    closed: bool = False

    def sample(self, batch_index: int) -> int:
        return self.backend.sample_row(batch_index, self.params)

    def logprobs(self, batch_index: int, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
        """The toy model is certain of its token."""
        return 0.0, [(token, 0.0)][:top_n]

    def close(self) -> None:
        assert not self.closed, "sampler closed twice"
        self.closed = True


@dataclass
class FakeDecodeBackend:
    n_ctx: int = 256
    n_batch: int = 32
    n_slots: int = 4
    shared_kv: bool = True
    """False: every sequence has its own ``n_ctx`` cells (llama.cpp's non-unified KV cache)."""
    partial_rm: bool = True
    """False imitates a cache that can only drop a sequence whole."""
    fail_status: int | None = None
    """When set, every decode returns this status."""
    kv: dict[int, list[int]] = field(default_factory=dict)
    batches: list[Batch] = field(default_factory=list)
    samplers: list[FakeSampler] = field(default_factory=list)
    removed: list[tuple[int, int]] = field(default_factory=list)
    copies: list[tuple[int, int, int]] = field(default_factory=list)
    _gate: threading.Semaphore | None = None

    def hold(self) -> None:
        """From now on each decode waits for :meth:`step` to allow it."""
        self._gate = threading.Semaphore(0)

    def step(self, n: int = 1) -> None:
        assert self._gate is not None
        for _ in range(n):
            self._gate.release()

    def run_free(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release()

    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], logits: Sequence[bool]
    ) -> int:
        gate = self._gate
        if gate is not None:
            gate.acquire()
        if self.fail_status is not None:
            return self.fail_status
        if len(tokens) > self.n_batch or not tokens:
            return -1
        if self.shared_kv:
            if sum(len(v) for v in self.kv.values()) + len(tokens) > self.n_ctx:
                return 1
        else:
            for seq in set(seqs):
                if len(self.kv.get(seq, [])) + seqs.count(seq) > self.n_ctx:
                    return 1
        for tok, pos, seq in zip(tokens, positions, seqs, strict=True):
            cache = self.kv.setdefault(seq, [])
            if pos != len(cache):
                raise AssertionError(f"seq {seq}: position {pos} but the cache holds {len(cache)}")
            cache.append(tok)
        self.batches.append(Batch(list(tokens), list(positions), list(seqs), list(logits)))
        return 0

    def sample_row(self, index: int, params: SamplingParams) -> int:
        batch = self.batches[-1]
        assert batch.logits[index], f"row {index} has no logits"
        seq, pos = batch.seqs[index], batch.positions[index]
        token = next_token(self.kv[seq][: pos + 1])
        for biased, bias in params.logit_bias.items():
            if bias <= -100 and token == biased:
                token = (token + 1) % VOCAB
        return token

    def seq_rm(self, seq: int, p0: int) -> bool:
        self.removed.append((seq, p0))
        cache = self.kv.setdefault(seq, [])
        if p0 > 0 and not self.partial_rm:
            return False
        del cache[p0:]
        return True

    def seq_cp(self, src: int, dst: int, n: int) -> bool:
        self.copies.append((src, dst, n))
        src_cache = self.kv.get(src, [])
        assert n <= len(src_cache), f"copy of {n} cells from seq {src} holding {len(src_cache)}"
        self.kv[dst] = list(src_cache[:n])
        return True

    def seq_state(self, seq: int) -> bytes | None:
        return json.dumps(self.kv.get(seq, [])).encode()

    def set_seq_state(self, seq: int, data: bytes) -> bool:
        self.kv[seq] = list(json.loads(data))
        return True

    def make_sampler(self, params: SamplingParams, history: Sequence[int]) -> FakeSampler:
        sampler = FakeSampler(self, params)
        self.samplers.append(sampler)
        return sampler

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def piece(self, token: int) -> bytes:
        return piece_of(token)


def reference(prompt: Sequence[int], max_tokens: int) -> tuple[str, str]:
    """What the toy model generates for ``prompt`` run alone: ``(text, finish_reason)``."""
    history = list(prompt)
    out = []
    for _ in range(max_tokens):
        token = next_token(history)
        if token == EOG:
            return "".join(out), "stop"
        out.append(piece_of(token).decode())
        history.append(token)
    return "".join(out), "length"


__all__ = ["EOG", "Batch", "FakeDecodeBackend", "FakeSampler", "next_token", "piece_of", "reference"]
