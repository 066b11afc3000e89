"""Admission of embedding requests: the refusal rule as a table (count bound, time bound), then
the queue's bookkeeping (admitted requests counted, refused ones not, the speed it learns)."""

from __future__ import annotations

from contextlib import ExitStack

import pytest

from agent.engine.embed_queue import EmbedQueue, refusal
from agent.errors import Overloaded


@pytest.mark.parametrize(
    ("in_flight", "queued_inputs", "seconds_per_input", "max_queue", "max_wait_s", "refused"),
    [
        pytest.param(0, 0, 5.0, 0, 0.1, None, id="nobody-in-flight-always-runs"),
        pytest.param(1, 2, 0.0, 8, 1.0, None, id="speed-not-measured-yet"),
        pytest.param(1, 2, 0.3, 8, 1.0, None, id="short-wait-admitted"),
        pytest.param(2, 4, 0.3, 8, 1.0, "embedding.max_wait_s", id="slow-model-long-wait-refused"),
        pytest.param(8, 16, 0.005, 8, 1.0, None, id="fast-model-long-queue-admitted"),
        pytest.param(9, 18, 0.005, 8, 1.0, "embedding.max_queue", id="count-bound-even-when-fast"),
        pytest.param(1, 1, 0.0, 0, 1.0, "embedding.max_queue", id="no-queue-one-computing"),
        pytest.param(1, 400, 0.003, 8, 1.0, "embedding.max_wait_s", id="one-big-request-ahead"),
    ],
)
def test_refusal(
    in_flight: int,
    queued_inputs: int,
    seconds_per_input: float,
    max_queue: int,
    max_wait_s: float,
    refused: str | None,
) -> None:
    reason = refusal(
        in_flight=in_flight,
        queued_inputs=queued_inputs,
        seconds_per_input=seconds_per_input,
        max_queue=max_queue,
        max_wait_s=max_wait_s,
    )
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


def test_the_request_beyond_the_queue_is_refused_with_429_and_not_counted() -> None:
    queue = EmbedQueue("minilm", max_queue=2)
    with ExitStack() as stack:
        for _ in range(3):
            stack.enter_context(queue.admit(2))
        assert (queue.in_flight, queue.queued_inputs) == (3, 6)
        with pytest.raises(Overloaded) as refused, queue.admit(1):
            pass
        assert refused.value.status == 429 and refused.value.retry_after > 0
        assert "minilm" in str(refused.value)
        assert (queue.in_flight, queue.queued_inputs) == (3, 6)
    assert (queue.in_flight, queue.queued_inputs) == (0, 0)


def test_the_measured_speed_bounds_the_wait() -> None:
    queue = EmbedQueue("gemma", max_queue=8, max_wait_s=1.0)
    queue.record(2, 1.2)  # 0.6 s per input
    assert queue.seconds_per_input == pytest.approx(0.6)
    with queue.admit(2), pytest.raises(Overloaded, match="max_wait_s"), queue.admit(2):
        pass
    queue.record(4, 0.04)  # faster now: the average moves towards 0.01 s per input
    assert 0.01 < queue.seconds_per_input < 0.6


def test_a_request_that_fails_leaves_the_queue() -> None:
    queue = EmbedQueue("minilm", 0)
    with pytest.raises(RuntimeError), queue.admit(1):
        raise RuntimeError("onnxruntime failed")
    with queue.admit(1):
        assert queue.in_flight == 1


@pytest.mark.parametrize(
    ("max_queue", "max_wait_s", "message"),
    [
        pytest.param(-1, 1.0, "max_queue", id="negative-queue"),
        pytest.param(1, 0.0, "max_wait_s", id="zero-wait"),
    ],
)
def test_bad_bounds_are_refused(max_queue: int, max_wait_s: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EmbedQueue("minilm", max_queue, max_wait_s)
