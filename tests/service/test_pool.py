"""The model pool: budget, eviction, idle unload, pins, hot swap and rollback (fake engines)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from agent.engine.base import CompletionRequest, EngineState
from agent.engine.pool import ModelPool, SwapFailed, default_memory_budget
from agent.errors import EngineError, ModelLoadError, ModelNotReady, NotFound, Overloaded
from tests.fakes.engine import FakeBehaviour, FakeEngine, FakeFactory, fake_info

MiB = 1 << 20


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def collect(engine: Any, rid: str, max_tokens: int = 3) -> str:
    parts = []
    async for chunk in engine.generate(CompletionRequest(prompt="hi", max_tokens=max_tokens, request_id=rid)):
        parts.append(chunk.text)
    return "".join(parts)


def test_resolve_default_and_named() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ModelPool(factory)
        pool.register(fake_info("a"))
        pool.register(fake_info("b"))
        pool.start_loading()
        await pool.wait_loaded()
        assert pool.default_id == "a"
        assert pool.resolve(None).info.id == "a"
        assert [m.id for m in pool.models()] == ["a", "b"]
        # b loads on demand: the first request is told to retry, the next one is served.
        with pytest.raises(ModelNotReady, match="loading"):
            pool.resolve("b")
        await pool.wait_loaded()
        assert await collect(pool.resolve("b"), "r1") == "b-0 b-1 b-2 "
        await pool.close()

    run(main())


CHAT_DEFAULTS = [
    pytest.param([("base", "completion"), ("tuned", "chat")], set(), "tuned", id="first-chat-model"),
    pytest.param([("tuned", "chat"), ("base", "completion")], set(), "tuned", id="default-is-chat"),
    pytest.param([("base", "completion"), ("a", "chat"), ("b", "chat")], set(), "a", id="best-fit-first"),
    pytest.param([("base", "completion"), ("a", "chat"), ("b", "chat")], {"a"}, "b", id="skip-failed"),
    pytest.param([("base", "completion"), ("other", "completion")], set(), "base", id="no-chat-model"),
    pytest.param([("base", "completion"), ("e", "embedding")], set(), "base", id="embedding-is-not-chat"),
]


@pytest.mark.parametrize(("models", "failing", "chat_default"), CHAT_DEFAULTS)
def test_chat_requests_without_a_model_go_to_the_best_chat_model(
    models: list[tuple[str, str]], failing: set[str], chat_default: str
) -> None:
    """Completions keep the default; chat goes to a chat-tuned model, loaded at start."""

    async def main() -> None:
        factory = FakeFactory({m: FakeBehaviour(fail_load=True) for m in failing})
        pool = ModelPool(factory)
        for name, task in models:
            pool.register(fake_info(name, task=task))
        pool.start_loading()
        await pool.wait_loaded()
        assert pool.default_for("chat") == chat_default
        assert pool.resolve(None, "chat").info.id == chat_default  # loaded at start: no 503
        assert pool.resolve(None).info.id == models[0][0] == pool.default_for("completion")
        await pool.close()

    run(main())


def test_the_chat_default_is_not_unloaded_for_idleness() -> None:
    async def main() -> None:
        clock = Clock()
        pool = ModelPool(FakeFactory(), keep_alive_s=60, clock=clock)
        pool.register(fake_info("base"))
        pool.register(fake_info("tuned", task="chat"))
        pool.register(fake_info("spare", task="chat"))
        pool.start_loading()
        await pool.wait_loaded()
        with pytest.raises(ModelNotReady):
            pool.resolve("spare")
        await pool.wait_loaded()
        clock.now += 61
        assert pool.unload_idle() == ["spare"]
        await pool.close()

    run(main())


@pytest.mark.parametrize(
    ("setup", "request_id", "error", "match"),
    [
        pytest.param("empty", None, ModelNotReady, "no model is installed", id="no-model"),
        pytest.param("one", "nope", NotFound, r"'nope' is not served here \(available: a\)", id="unknown-id"),
        pytest.param("failed", None, EngineError, "failed to load", id="failed-model"),
    ],
)
def test_resolve_refusals(setup: str, request_id: str | None, error: type[Exception], match: str) -> None:
    async def main() -> None:
        factory = FakeFactory({"a": FakeBehaviour(fail_load=True)} if setup == "failed" else {})
        pool = ModelPool(factory)
        if setup != "empty":
            pool.register(fake_info("a"))
            pool.start_loading()
            await pool.wait_loaded()
        with pytest.raises(error, match=match):
            pool.resolve(request_id)
        await pool.close()

    run(main())


def test_added_engines_load_and_loading_flag() -> None:
    async def main() -> None:
        engine = FakeEngine(fake_info("a"), FakeBehaviour(load_delay_s=0.05))
        pool = ModelPool()  # no factory: the foundation's way, engines constructed by the caller
        pool.add(engine)
        assert not pool.loading
        pool.start_loading()
        assert pool.loading
        await pool.wait_loaded()
        assert not pool.loading
        assert engine.state is EngineState.READY
        await pool.close()
        assert engine.closed

    run(main())


def test_register_needs_a_factory() -> None:
    with pytest.raises(ModelLoadError, match="no engine factory"):
        ModelPool().register(fake_info("a"))


def test_budget_evicts_least_recently_used_idle_model() -> None:
    async def main() -> None:
        clock = Clock()
        factory = FakeFactory()
        pool = ModelPool(factory, memory_budget=250 * MiB, clock=clock)
        for name in "abc":
            pool.register(fake_info(name, 100))
        pool.start_loading()
        await pool.wait_loaded()
        for name in "bc":
            clock.now += 10
            with pytest.raises(ModelNotReady):
                pool.resolve(name)
            await pool.wait_loaded()
        # a (default) stays; b was idle the longest, so c's load evicted it.
        states = {s.id: s.state for s in pool.status()}
        assert states["a"] == "ready" and states["c"] == "ready"
        assert states["b"] in ("retiring", "unloaded")
        await pool.wait_retired()
        assert {s.id: s.state for s in pool.status()}["b"] == "unloaded"
        assert pool.memory_used() == 200 * MiB
        await pool.close()

    run(main())


@pytest.mark.parametrize(
    ("budget_mb", "max_loaded", "pin_b", "match"),
    [
        pytest.param(50, 4, False, "more than the whole budget", id="larger-than-budget"),
        pytest.param(250, 4, True, "does not fit", id="pinned-not-evicted"),
        pytest.param(None, 2, True, "2 of 2 models", id="count-limit"),
    ],
)
def test_budget_refusals(budget_mb: int | None, max_loaded: int, pin_b: bool, match: str) -> None:
    async def main() -> None:
        pool = ModelPool(
            FakeFactory(), memory_budget=budget_mb * MiB if budget_mb else None, max_loaded=max_loaded
        )
        pool.register(fake_info("a", 40))
        pool.register(fake_info("b", 100), pinned=pin_b)
        pool.register(fake_info("c", 120))
        pool.start_loading()
        await pool.wait_loaded()
        with pytest.raises(Overloaded, match=match) as info:
            pool.resolve("c")
        assert info.value.status == 503 and info.value.retry_after > 0
        await pool.close()

    run(main())


def test_idle_unload_spares_default_pinned_and_busy() -> None:
    async def main() -> None:
        clock = Clock()
        factory = FakeFactory()
        pool = ModelPool(factory, keep_alive_s=60, clock=clock)
        pool.register(fake_info("default"))
        pool.register(fake_info("pinned"), pinned=True)
        pool.register(fake_info("busy"))
        pool.register(fake_info("idle"))
        pool.start_loading()
        for name in ("busy", "idle"):
            with pytest.raises(ModelNotReady):
                pool.resolve(name)
        await pool.wait_loaded()
        busy = pool.resolve("busy")
        assert isinstance(busy, FakeEngine)
        busy.gate = asyncio.Event()
        stream = busy.generate(CompletionRequest(prompt="x", max_tokens=3))
        await anext(stream)  # one request in flight
        clock.now += 30
        assert pool.unload_idle() == []
        clock.now += 31
        assert pool.unload_idle() == ["idle"]
        busy.gate.set()
        async for _ in stream:
            pass
        assert pool.unload_idle() == ["busy"]
        await pool.wait_retired()
        states = {s.id: s.state for s in pool.status()}
        assert states == {"default": "ready", "pinned": "ready", "busy": "unloaded", "idle": "unloaded"}
        # An unloaded model comes back on demand with a fresh engine.
        with pytest.raises(ModelNotReady):
            pool.resolve("idle")
        await pool.wait_loaded()
        assert await collect(pool.resolve("idle"), "again") == "idle-0 idle-1 idle-2 "
        assert sum(1 for e in factory.built if e.info.id == "idle") == 2
        await pool.close()

    run(main())


def test_hot_swap_keeps_in_flight_stream_on_the_old_model() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ModelPool(factory, settle_s=0.05)
        pool.register(fake_info("old"))
        pool.start_loading()
        await pool.wait_loaded()
        old = pool.resolve(None)
        assert isinstance(old, FakeEngine)
        old.gate = asyncio.Event()
        stream = old.generate(CompletionRequest(prompt="x", max_tokens=4, request_id="inflight"))
        first = await anext(stream)
        result = await pool.swap(fake_info("new"))
        assert (result.previous, result.current) == ("old", "new")
        assert pool.default_id == "new"
        # New requests go to the new model while the old stream is still open.
        assert await collect(pool.resolve(None), "after") == "new-0 new-1 new-2 "
        assert {s.id: s.state for s in pool.status()}["old"] == "retiring"
        assert not old.closed
        old.gate.set()
        rest = [c async for c in stream]
        assert first.text + "".join(c.text for c in rest) == "old-0 old-1 old-2 old-3 "
        assert rest[-1].finish_reason == "length"
        await pool.wait_retired()
        assert old.closed
        assert pool.swaps["ok"] == 1
        await pool.close()

    run(main())


@pytest.mark.parametrize(
    ("behaviour", "size_mb", "reason"),
    [
        pytest.param(FakeBehaviour(fail_load=True), 100, "load_failed", id="load-fails"),
        pytest.param(FakeBehaviour(finish_reason="error"), 100, "smoke_failed", id="smoke-error"),
        pytest.param(FakeBehaviour(produce_tokens=False), 100, "smoke_failed", id="smoke-no-tokens"),
        pytest.param(FakeBehaviour(first_token_delay_s=5), 100, "smoke_failed", id="smoke-timeout"),
        pytest.param(FakeBehaviour(), 900, "over_budget", id="over-budget"),
    ],
)
def test_swap_rolls_back_to_the_previous_model(behaviour: FakeBehaviour, size_mb: int, reason: str) -> None:
    async def main() -> None:
        factory = FakeFactory({"new": behaviour})
        events: list[tuple[str, str]] = []
        pool = ModelPool(factory, memory_budget=500 * MiB, smoke_timeout_s=0.5)
        pool.add_listener(lambda event, model: events.append((event, model)))
        pool.register(fake_info("old"))
        pool.start_loading()
        await pool.wait_loaded()
        old = pool.resolve(None)
        with pytest.raises(SwapFailed, match=rf"\({reason}\).*still serving 'old'") as failure:
            await pool.swap(fake_info("new", size_mb))
        assert failure.value.reason == reason
        assert pool.default_id == "old"
        assert pool.resolve(None) is old
        assert not isinstance(old, FakeEngine) or not old.closed
        assert all(e.closed for e in factory.built if e.info.id == "new")
        assert pool.swaps[reason] == 1 and pool.swaps["ok"] == 0
        assert ("swap_failed", "new") in events
        assert "new" not in {s.id for s in pool.status()}
        await pool.close()

    run(main())


def test_swap_to_the_current_model_is_a_no_op_and_can_pin() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ModelPool(factory)
        pool.register(fake_info("a"))
        pool.start_loading()
        await pool.wait_loaded()
        result = await pool.swap(fake_info("a"), pin=True)
        assert (result.previous, result.current, result.load_s) == ("a", "a", 0.0)
        assert len(factory.built) == 1
        assert [s.pinned for s in pool.status()] == [True]
        await pool.close()

    run(main())


def test_swap_to_a_new_version_of_the_same_id_drains_the_old_engine() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ModelPool(factory, settle_s=0.0)
        pool.register(fake_info("m", 100))
        pool.start_loading()
        await pool.wait_loaded()
        first = pool.resolve("m")
        await pool.swap(fake_info("m", 120))
        second = pool.resolve("m")
        assert second is not first and second.info.size_bytes == 120 * MiB
        await pool.wait_retired()
        assert isinstance(first, FakeEngine) and first.closed
        await pool.close()

    run(main())


def test_pinned_previous_model_stays_loaded_after_a_swap() -> None:
    async def main() -> None:
        pool = ModelPool(FakeFactory(), settle_s=0.0)
        pool.register(fake_info("old"), pinned=True)
        pool.start_loading()
        await pool.wait_loaded()
        await pool.swap(fake_info("new"))
        await pool.wait_retired()
        states = {s.id: (s.state, s.default) for s in pool.status()}
        assert states == {"new": ("ready", True), "old": ("ready", False)}
        await pool.close()

    run(main())


def test_drain_timeout_closes_a_stuck_old_engine() -> None:
    async def main() -> None:
        pool = ModelPool(FakeFactory(), settle_s=0.0, drain_timeout_s=0.2)
        pool.register(fake_info("old"))
        pool.start_loading()
        await pool.wait_loaded()
        old = pool.resolve(None)
        assert isinstance(old, FakeEngine)
        old.gate = asyncio.Event()
        stream = old.generate(CompletionRequest(prompt="x", max_tokens=3))
        await anext(stream)
        await pool.swap(fake_info("new"))
        await pool.wait_retired()
        assert old.closed
        await stream.aclose()
        await pool.close()

    run(main())


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        pytest.param(None, None, id="no-cgroup-limit"),
        pytest.param(512 * MiB, 384 * MiB, id="cgroup-limit"),
        pytest.param(1 << 60, None, id="limit-above-ram"),
    ],
)
def test_default_memory_budget(limit: int | None, expected: int | None) -> None:
    import psutil

    budget = default_memory_budget(0.75, limit)
    assert budget == (expected if expected is not None else int(psutil.virtual_memory().total * 0.75))


def test_swap_to_a_loaded_model_promotes_it_without_a_second_copy() -> None:
    async def main() -> None:
        factory = FakeFactory()
        pool = ModelPool(factory, settle_s=0.0)
        pool.register(fake_info("a"))
        pool.register(fake_info("b"))
        pool.start_loading()
        with pytest.raises(ModelNotReady):
            pool.resolve("b")
        await pool.wait_loaded()
        b = pool.resolve("b")
        result = await pool.swap(fake_info("b"))
        assert (result.previous, result.current) == ("a", "b")
        assert pool.resolve(None) is b
        assert len(factory.built) == 2  # a and b, nothing more
        await pool.wait_retired()
        assert {s.id: s.state for s in pool.status()} == {"b": "ready", "a": "unloaded"}
        assert pool.swaps["ok"] == 1
        await pool.close()

    run(main())


def test_an_engine_crashing_while_loading_is_contained() -> None:
    async def main() -> None:
        factory = FakeFactory({"bad": FakeBehaviour(crash_load=True)})
        pool = ModelPool(factory)
        pool.register(fake_info("bad"))
        pool.register(fake_info("good"))
        pool.start_loading()
        await pool.wait_loaded()
        assert not pool.loading  # never stuck "loading"
        with pytest.raises(EngineError, match="RuntimeError: segfault averted by luck"):
            pool.resolve("bad")
        assert [m.id for m in pool.models()] == ["good"]
        assert {s.id: s.state for s in pool.status()}["bad"] == "failed"
        assert factory.built[0].closed
        await pool.close()

    run(main())


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        pytest.param({"memory_budget_mb": 512}, {"memory_budget": 512 * MiB}, id="budget-in-mib"),
        pytest.param({"smoke_test": False}, {"smoke_test": None}, id="smoke-test-off"),
        pytest.param({"keep_alive_s": 5, "max_loaded": 2}, {"keep_alive_s": 5, "max_loaded": 2}, id="limits"),
        pytest.param({}, {"cold_swap": True}, id="cold-swap-default-on"),
        pytest.param({"cold_swap": False}, {"cold_swap": False}, id="cold-swap-off"),
    ],
)
def test_pool_options_from_settings(section: dict[str, Any], expected: dict[str, Any]) -> None:
    from agent.config import PoolSettings
    from agent.engine.pool import pool_options, smoke_generate

    options = pool_options(PoolSettings(**section))
    assert {k: options[k] for k in expected} == expected
    if "smoke_test" not in section:
        assert options["smoke_test"] is smoke_generate
    if "memory_budget_mb" not in section:
        assert options["memory_budget"] == default_memory_budget()


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        pytest.param(
            "memory_budget_mb = 1", r"pool.memory_budget_mb = 1: .*greater than or equal to 16", id="tiny"
        ),
        pytest.param(
            "max_loaded = 0", r"pool.max_loaded = 0: .*greater than or equal to 1", id="none-allowed"
        ),
        pytest.param(
            "keep_alive_s = -1", r"pool.keep_alive_s = -1: .*greater than or equal to 0", id="negative"
        ),
        pytest.param("drain_timeout_s = 0", r"pool.drain_timeout_s = 0: .*greater than 0", id="zero-drain"),
        pytest.param('pined = ["x"]', r"pool.pined = \['x'\]: unknown setting", id="typo"),
    ],
)
def test_bad_pool_settings_are_refused(tmp_path: Path, toml: str, match: str) -> None:
    from agent.config import load_settings
    from agent.errors import ConfigError

    config = tmp_path / "config.toml"
    config.write_text(f"[pool]\n{toml}\n")
    with pytest.raises(ConfigError, match=match):
        load_settings(config)


# -- cold swap: the new model fits only in place of the current default ------------------------


async def small_box(
    factory: FakeFactory, *, pin_old: bool = False, **kw: Any
) -> tuple[ModelPool, FakeEngine]:
    """A 150 MiB budget serving ``old`` (100 MiB): a second 100 MiB model cannot load next to it."""
    pool = ModelPool(factory, memory_budget=150 * MiB, smoke_timeout_s=0.5, settle_s=0.0, **kw)
    pool.register(fake_info("old", 100), pinned=pin_old)
    pool.start_loading()
    await pool.wait_loaded()
    old = pool.resolve(None)
    assert isinstance(old, FakeEngine)
    return pool, old


def test_cold_swap_replaces_the_default_when_both_do_not_fit() -> None:
    async def main() -> None:
        factory = FakeFactory({"new": FakeBehaviour(load_delay_s=0.2)})
        pool, old = await small_box(factory)
        old.gate = asyncio.Event()
        stream = old.generate(CompletionRequest(prompt="x", max_tokens=3, request_id="inflight"))
        first = await anext(stream)
        swap = asyncio.create_task(pool.swap(fake_info("new", 100)))
        await asyncio.sleep(0.05)
        # The old model drains its stream before it is unloaded; new requests are told to retry.
        with pytest.raises(ModelNotReady, match="being replaced") as refused:
            pool.resolve(None)
        assert refused.value.retry_after == 5.0
        assert not swap.done() and not old.closed
        old.gate.set()
        rest = [c async for c in stream]
        assert first.text + "".join(c.text for c in rest) == "old-0 old-1 old-2 "
        result = await swap
        assert (result.previous, result.current) == ("old", "new")
        assert old.closed and pool.default_id == "new"
        assert await collect(pool.resolve(None), "after") == "new-0 new-1 new-2 "
        assert pool.memory_used() == 100 * MiB
        assert (pool.swaps["ok"], pool.swaps["cold"]) == (1, 1)
        await pool.close()

    run(main())


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        pytest.param(FakeBehaviour(fail_load=True), "load_failed", id="load-fails"),
        pytest.param(FakeBehaviour(finish_reason="error"), "smoke_failed", id="smoke-error"),
        pytest.param(FakeBehaviour(first_token_delay_s=5), "smoke_failed", id="smoke-timeout"),
    ],
)
def test_failed_cold_swap_loads_the_previous_model_again(behaviour: FakeBehaviour, reason: str) -> None:
    async def main() -> None:
        factory = FakeFactory({"new": behaviour})
        pool, old = await small_box(factory)
        with pytest.raises(SwapFailed, match=rf"\({reason}\).*still serving 'old'") as failure:
            await pool.swap(fake_info("new", 100))
        assert failure.value.reason == reason
        again = pool.resolve(None)
        assert again is not old and again.info.id == "old" and again.state is EngineState.READY
        assert old.closed and all(e.closed for e in factory.built if e.info.id == "new")
        assert await collect(again, "after") == "old-0 old-1 old-2 "
        assert (pool.swaps[reason], pool.swaps["cold"], pool.swaps["ok"]) == (1, 1, 0)
        await pool.close()

    run(main())


@pytest.mark.parametrize(
    ("options", "size_mb", "match"),
    [
        pytest.param({"cold_swap": False}, 100, "does not fit", id="cold-swap-off"),
        pytest.param({"pin_old": True}, 100, "does not fit", id="pinned-default-stays"),
        pytest.param({}, 200, "more than the whole budget", id="bigger-than-the-budget"),
    ],
)
def test_swap_that_cannot_replace_the_default_is_refused(
    options: dict[str, Any], size_mb: int, match: str
) -> None:
    async def main() -> None:
        pool, old = await small_box(FakeFactory(), **options)
        with pytest.raises(SwapFailed, match=rf"\(over_budget\).*{match}"):
            await pool.swap(fake_info("new", size_mb))
        assert pool.resolve(None) is old and not old.closed
        assert (pool.swaps["over_budget"], pool.swaps["cold"]) == (1, 0)
        await pool.close()

    run(main())


def test_cold_swap_to_a_new_version_of_the_same_model() -> None:
    async def main() -> None:
        pool, old = await small_box(FakeFactory())
        await pool.swap(fake_info("old", 120))
        current = pool.resolve(None)
        assert current is not old and current.info.size_bytes == 120 * MiB and old.closed
        assert pool.swaps["cold"] == 1 and pool.memory_used() == 120 * MiB
        await pool.close()

    run(main())


def test_no_other_model_loads_during_a_cold_swap() -> None:
    async def main() -> None:
        factory = FakeFactory({"new": FakeBehaviour(load_delay_s=0.2)})
        pool, _ = await small_box(factory)
        pool.register(fake_info("side", 40))
        swap = asyncio.create_task(pool.swap(fake_info("new", 100)))
        await asyncio.sleep(0.1)
        with pytest.raises(ModelNotReady, match="being replaced"):
            pool.resolve("side")
        assert not [e for e in factory.built if e.info.id == "side"]
        await swap
        assert pool.default_id == "new"
        await pool.close()

    run(main())


def test_remove_drains_in_flight_requests_and_forgets_the_model() -> None:
    async def main() -> None:
        factory = FakeFactory({"side": FakeBehaviour(load_delay_s=0.1)})
        events: list[tuple[str, str]] = []
        pool = ModelPool(factory, settle_s=0.0)
        pool.add_listener(lambda event, model: events.append((event, model)))
        pool.register(fake_info("main"))
        pool.register(fake_info("side"))
        pool.register(fake_info("loading"))
        pool.start_loading()
        await pool.wait_loaded()
        with pytest.raises(ModelNotReady):
            pool.resolve("side")
        await pool.wait_loaded()
        side = pool.resolve("side")
        assert isinstance(side, FakeEngine)
        side.gate = asyncio.Event()
        stream = side.generate(CompletionRequest(prompt="x", max_tokens=3, request_id="inflight"))
        first = await anext(stream)
        assert await pool.remove("side")
        with pytest.raises(NotFound, match="'side' is not served here"):
            pool.resolve("side")
        assert "side" not in [m.id for m in pool.models()] and not side.closed
        side.gate.set()
        rest = [c async for c in stream]
        assert first.text + "".join(c.text for c in rest) == "side-0 side-1 side-2 "
        await pool.wait_retired()
        assert side.closed and ("removed", "side") in events
        # A model still loading is awaited, then closed; an unknown one is a no-op.
        with pytest.raises(ModelNotReady):
            pool.resolve("loading")
        assert await pool.remove("loading")
        await pool.wait_retired()
        assert all(e.closed for e in factory.built if e.info.id == "loading")
        assert not await pool.remove("nothing-here")
        with pytest.raises(EngineError, match="default model"):
            await pool.remove("main")
        assert pool.resolve(None).info.id == "main"
        await pool.close()

    run(main())


@pytest.mark.parametrize(
    ("budget_mb", "max_loaded", "evicted"),
    [
        pytest.param(400, 5, [], id="still-fits"),
        pytest.param(200, 5, ["c"], id="budget-lowered-lru-first"),
        pytest.param(150, 5, ["c", "d"], id="budget-lowered-more"),
        pytest.param(1000, 3, ["c", "d"], id="count-lowered"),
        pytest.param(50, 1, ["c", "d"], id="default-pinned-busy-stay"),
    ],
)
def test_fit_limits_unloads_idle_models_after_the_limits_were_lowered(
    budget_mb: int, max_loaded: int, evicted: list[str]
) -> None:
    async def main() -> None:
        clock = Clock()
        pool = ModelPool(FakeFactory(), memory_budget=1 << 30, max_loaded=10, clock=clock, settle_s=0.0)
        for model_id in ("main", "pinned", "c", "d", "busy"):
            pool.register(fake_info(model_id, 50), pinned=model_id == "pinned")
        pool.start_loading()
        await pool.wait_loaded()
        for model_id in ("c", "d", "busy"):  # loaded on demand, c used least recently
            clock.now += 1
            with pytest.raises(ModelNotReady):
                pool.resolve(model_id)
            await pool.wait_loaded()
        busy = pool.resolve("busy")
        assert isinstance(busy, FakeEngine)
        busy.gate = asyncio.Event()
        stream = busy.generate(CompletionRequest(prompt="x", max_tokens=2, request_id="busy"))
        await anext(stream)
        pool.memory_budget, pool.max_loaded = budget_mb * MiB, max_loaded
        assert pool.fit_limits() == evicted
        state = {s.id: s.state for s in pool.status() if s.state != "retiring"}
        assert [m for m, st in state.items() if st == "unloaded"] == evicted
        assert state["main"] == state["pinned"] == state["busy"] == "ready"
        busy.gate.set()
        assert [c async for c in stream][-1].finish_reason == "length"
        await pool.close()

    run(main())


async def old_and_side(**kw: Any) -> ModelPool:
    """200 MiB: the default ``old`` (100 MiB) and an idle ``side`` (60 MiB), both loaded."""
    pool = ModelPool(FakeFactory(), memory_budget=200 * MiB, smoke_timeout_s=0.5, settle_s=0.0, **kw)
    pool.register(fake_info("old", 100))
    pool.register(fake_info("side", 60))
    pool.start_loading()
    await pool.wait_loaded()
    with pytest.raises(ModelNotReady):
        pool.resolve("side")
    await pool.wait_loaded()
    return pool


def test_cold_swap_counts_idle_models_it_may_evict() -> None:
    """A 150 MiB model fits once both ``old`` and ``side`` are gone."""

    async def main() -> None:
        pool = await old_and_side()
        await pool.swap(fake_info("new", 150))
        assert pool.default_id == "new" and pool.swaps["cold"] == 1
        await pool.wait_retired()
        states = {s.id: s.state for s in pool.status()}
        assert states == {"new": "ready", "old": "unloaded", "side": "unloaded"}
        assert pool.memory_used() == 150 * MiB
        await pool.close()

    run(main())


def test_refused_swap_evicts_nothing() -> None:
    async def main() -> None:
        pool = await old_and_side(cold_swap=False)
        with pytest.raises(SwapFailed, match="over_budget"):
            await pool.swap(fake_info("new", 150))
        assert {s.id: s.state for s in pool.status()} == {"old": "ready", "side": "ready"}
        await pool.close()

    run(main())
