"""Sharing the cores: the pure rules (next turn, generation threads) as tables, then the real
``CoreShare`` with threads: the order in which queued callers get their turn (``turns`` mode),
the thread budget while an embedding computes (``split``), nothing coordinated (``off``).
No timing involved."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from agent.engine.core_share import CoreShare, Mode, TurnKind, generation_threads, next_turn


@pytest.mark.parametrize(
    ("waiting", "last", "expected"),
    [
        pytest.param({}, None, None, id="nobody-waits"),
        pytest.param({"generate": 0, "embed": 0}, "generate", None, id="zero-counts-are-nobody"),
        pytest.param({"generate": 3}, None, "generate", id="only-generation-waits"),
        pytest.param({"generate": 3}, "generate", "generate", id="generation-alone-keeps-going"),
        pytest.param({"embed": 2}, "embed", "embed", id="embeddings-alone-keep-going"),
        pytest.param({"generate": 1, "embed": 1}, None, "embed", id="first-turn-short-work-first"),
        pytest.param({"generate": 1, "embed": 5}, "generate", "embed", id="after-a-step-an-embedding"),
        pytest.param({"generate": 1, "embed": 5}, "embed", "generate", id="after-an-embedding-a-step"),
        pytest.param({"generate": 4, "embed": 1}, "embed", "generate", id="many-steps-one-embedding"),
    ],
)
def test_next_turn(waiting: dict[TurnKind, int], last: TurnKind | None, expected: TurnKind | None) -> None:
    assert next_turn(waiting, last) == expected


@pytest.mark.parametrize(
    ("mode", "n_threads", "embed_threads", "active", "expected"),
    [
        pytest.param("split", 2, 1, False, 2, id="split-no-embedding-all-threads"),
        pytest.param("split", 2, 1, True, 1, id="split-embedding-takes-one-of-two"),
        pytest.param("split", 4, 1, True, 3, id="split-four-cores"),
        pytest.param("split", 4, 2, True, 2, id="split-two-for-embeddings"),
        pytest.param("split", 2, 2, True, 1, id="split-generation-keeps-at-least-one"),
        pytest.param("split", 1, 1, True, 1, id="split-one-core"),
        pytest.param("turns", 2, 2, True, 2, id="turns-never-shrink-a-step"),
        pytest.param("off", 2, 2, True, 2, id="off-never-shrinks-a-step"),
    ],
)
def test_generation_threads(
    mode: Mode, n_threads: int, embed_threads: int, active: bool, expected: int
) -> None:
    assert generation_threads(mode, n_threads, embed_threads, active) == expected


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    """Poll until ``condition`` holds; a hang guard, not a timing assertion."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.001)


def _queued(turns: CoreShare, names: list[tuple[str, TurnKind]], order: list[str]) -> list[threading.Thread]:
    """Start one thread per name, each queued (in list order) for a turn that records its name."""
    threads = []
    for count, (name, kind) in enumerate(names, start=1):

        def take(name: str = name, kind: TurnKind = kind) -> None:
            with turns.turn(kind):
                order.append(name)

        thread = threading.Thread(target=take, name=name)
        thread.start()
        threads.append(thread)
        _wait_for(lambda c=count: sum(turns._waiting().values()) == c, f"{name} to queue")
    return threads


@pytest.mark.parametrize(
    ("holder", "queued", "expected"),
    [
        pytest.param(
            "generate",
            [("g1", "generate"), ("e1", "embed")],
            ["e1", "g1"],
            id="an-embedding-queued-after-a-step-goes-first",
        ),
        pytest.param(
            "generate",
            [("e1", "embed"), ("e2", "embed"), ("e3", "embed"), ("g1", "generate"), ("g2", "generate")],
            ["e1", "g1", "e2", "g2", "e3"],
            id="kinds-alternate-fifo-within-a-kind",
        ),
        pytest.param(
            "embed",
            [("e1", "embed"), ("e2", "embed"), ("g1", "generate")],
            ["g1", "e1", "e2"],
            id="generation-is-not-starved-by-embeddings",
        ),
        pytest.param(
            "embed",
            [("g1", "generate"), ("g2", "generate")],
            ["g1", "g2"],
            id="one-kind-first-come-first-served",
        ),
    ],
)
def test_queued_turns_are_granted_in_the_rule_order(
    holder: TurnKind, queued: list[tuple[str, TurnKind]], expected: list[str]
) -> None:
    turns = CoreShare("turns")
    order: list[str] = []
    with turns.turn(holder):
        threads = _queued(turns, queued, order)
        assert order == []  # nobody runs beside the holder
    for thread in threads:
        thread.join(30)
    assert order == expected
    assert turns.stats.turns[holder] == 1 + sum(1 for _, k in queued if k == holder)


def test_a_turn_is_released_when_its_call_raises() -> None:
    turns = CoreShare("turns")
    with pytest.raises(RuntimeError, match="decode failed"), turns.turn("generate"):
        raise RuntimeError("decode failed")
    done = threading.Event()

    def take() -> None:
        with turns.turn("embed"):
            done.set()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join(30)
    assert done.is_set()


def test_disabled_turns_let_calls_run_side_by_side() -> None:
    turns = CoreShare("off")
    inside = threading.Barrier(2, timeout=30)  # both must be inside their turn at once

    def take(kind: TurnKind) -> None:
        with turns.turn(kind):
            inside.wait()

    threads = [threading.Thread(target=take, args=(k,)) for k in ("generate", "embed")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not inside.broken


def test_an_unknown_kind_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'prefill'"), CoreShare("turns").turn("prefill"):  # type: ignore[arg-type]
        pass


def test_split_gives_generation_fewer_threads_only_while_an_embedding_computes() -> None:
    share = CoreShare("split", embed_threads=1)
    assert share.generation_threads(2) == 2
    inside = threading.Event()
    release = threading.Event()

    def embed() -> None:
        with share.turn("embed"):
            inside.set()
            release.wait(30)

    thread = threading.Thread(target=embed)
    thread.start()
    assert inside.wait(30)
    with share.turn("generate"):  # split never blocks a generation step
        assert share.generation_threads(2) == 1
    release.set()
    thread.join(30)
    assert share.generation_threads(2) == 2
    assert share.stats.turns == {"embed": 1, "generate": 1}


def test_an_unknown_mode_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="'fair'"):
        CoreShare("fair")  # type: ignore[arg-type]
