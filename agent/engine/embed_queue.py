"""Admission of embedding requests: a bounded wait per embedding engine, refused beyond it.

Generation has its bound (``engine.max_queue`` beyond the slots, :mod:`agent.engine.batching`);
embedding requests had none, so under many clients they piled up behind each other and each waited
for all those before it (docs/benchmarks.md, *Load: short requests*). Now each engine admits a
request only when the inputs already in flight would take at most ``embedding.max_wait_s`` to
compute at the measured speed (seconds per input, a moving average of the engine's own batches),
and never more than ``1 + embedding.max_queue`` requests; otherwise 429 with ``Retry-After``, as
for a full generation queue. A fast model (MiniLM) thus admits a long queue and a slow one (a
270M-parameter GGUF) a short one, each bounded in time rather than only in count.

Invariants: ``in_flight`` / ``queued_inputs`` count the admitted requests (and their inputs) not yet
finished, computing or waiting; a request arriving when none is in flight is always admitted
(it waits for nobody); a refused request is never counted; leaving is guaranteed by the context
manager, whatever the request raised. :meth:`EmbedQueue.record` may be called from any thread
(one float assignment); the rest runs on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from agent.errors import Overloaded

__all__ = ["EmbedQueue", "refusal"]

SMOOTHING = 0.2
"""Weight of the newest batch in the moving average of seconds per input."""


def refusal(
    *, in_flight: int, queued_inputs: int, seconds_per_input: float, max_queue: int, max_wait_s: float
) -> str | None:
    """Why a new request must be refused (which bound it would pass), or ``None`` to admit it."""
    if in_flight == 0:
        return None
    if in_flight >= 1 + max_queue:
        return f"{in_flight} requests in flight (1 computing + embedding.max_queue {max_queue} waiting)"
    wait = queued_inputs * seconds_per_input
    if wait > max_wait_s:
        return (
            f"the {queued_inputs} inputs ahead would take ~{wait:.1f} s (embedding.max_wait_s {max_wait_s:g})"
        )
    return None


class EmbedQueue:
    def __init__(self, model_id: str, max_queue: int, max_wait_s: float = float("inf")) -> None:
        if max_queue < 0:
            raise ValueError("max_queue must be at least 0")
        if max_wait_s <= 0:
            raise ValueError("max_wait_s must be positive")
        self._model_id = model_id
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.in_flight = 0
        self.queued_inputs = 0
        self.seconds_per_input = 0.0
        """Moving average over computed batches; 0 until the first one (everything admitted)."""

    @contextmanager
    def admit(self, n_inputs: int) -> Iterator[None]:
        """Count the request in for its lifetime, or raise :class:`Overloaded` (429) when full."""
        reason = refusal(
            in_flight=self.in_flight,
            queued_inputs=self.queued_inputs,
            seconds_per_input=self.seconds_per_input,
            max_queue=self.max_queue,
            max_wait_s=self.max_wait_s,
        )
        if reason is not None:
            raise Overloaded(f"model {self._model_id}: {reason}; retry shortly", retry_after=1.0, status=429)
        self.in_flight += 1
        self.queued_inputs += n_inputs
        try:
            yield
        finally:
            self.in_flight -= 1
            self.queued_inputs -= n_inputs

    def record(self, n_inputs: int, seconds: float) -> None:
        """A batch of ``n_inputs`` inputs took ``seconds`` to compute."""
        if n_inputs <= 0:
            return
        sample = seconds / n_inputs
        old = self.seconds_per_input
        self.seconds_per_input = sample if old == 0.0 else old + SMOOTHING * (sample - old)
