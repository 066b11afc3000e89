"""hub/sync/latest.py: the newest value per key, written in batches by one writer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from fleet.messages import StateReport
from hub.sync import latest
from hub.sync.db import DatabaseUnavailable
from hub.sync.latest import LatestWriter
from hub.sync.store import HubStore


class Recorder:
    """A write function that records its batches; ``gate`` holds a write until released."""

    def __init__(self, fail: list[BaseException] | None = None) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.fail = list(fail or [])
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __call__(self, batch: Sequence[tuple[str, int]]) -> None:
        self.entered.set()
        self.gate.wait(10)
        if self.fail:
            raise self.fail.pop(0)
        self.batches.append(list(batch))


async def test_values_put_during_a_write_go_in_the_next_batch_newest_per_key() -> None:
    rec = Recorder()
    rec.gate.clear()
    w: LatestWriter[str, int] = LatestWriter(rec, "t")
    w.put("a", 1)
    await asyncio.to_thread(rec.entered.wait, 10)  # the first write holds {"a": 1}
    for key, value in [("a", 2), ("b", 1), ("a", 3), ("c", 1), ("b", 2)]:
        w.put(key, value)
    rec.gate.set()
    await asyncio.wait_for(w.flushed(), 10)
    assert rec.batches == [[("a", 1)], [("a", 3), ("b", 2), ("c", 1)]]
    assert (w.writes, w.values) == (2, 4)


@pytest.mark.parametrize(
    ("failure", "written"),
    [
        pytest.param(DatabaseUnavailable("restarting"), [[("a", 1), ("b", 1)]], id="unavailable-retried"),
        pytest.param(RuntimeError("a bug"), [], id="other-failure-dropped"),
    ],
)
async def test_a_failed_write(
    monkeypatch: pytest.MonkeyPatch, failure: BaseException, written: list[list[tuple[str, int]]]
) -> None:
    monkeypatch.setattr(latest, "RETRY_S", 0.01)
    rec = Recorder(fail=[failure])
    w: LatestWriter[str, int] = LatestWriter(rec, "t")
    w.put("a", 1)
    w.put("b", 1)
    await asyncio.wait_for(w.flushed(), 10)
    assert rec.batches == written


async def test_a_newer_value_wins_over_a_retried_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latest, "RETRY_S", 0.2)
    rec = Recorder(fail=[DatabaseUnavailable("restarting")])
    w: LatestWriter[str, int] = LatestWriter(rec, "t")
    w.put("a", 1)
    await asyncio.to_thread(rec.entered.wait, 10)
    await asyncio.sleep(0.05)  # the write failed; the writer waits RETRY_S
    w.put("a", 2)
    await asyncio.wait_for(w.flushed(), 10)
    assert rec.batches == [[("a", 2)]]


def report(device: str, model: str) -> StateReport:
    return StateReport(device, True, "0.1.0", ("edge",), {}, model, (model,))


def test_record_states_writes_many_in_one_call_and_skips_a_foreign_report(tmp_path: Path) -> None:
    store = HubStore(tmp_path / "hub.db")
    try:
        store.record_states([("dev-a", report("dev-a", "m1")), ("dev-b", report("dev-b", "m2"))], now=10.0)
        store.record_states([("dev-a", report("dev-a", "m3")), ("dev-c", report("dev-x", "m4"))], now=11.0)
        rows = {d.device: d for d in store.devices()}
        assert set(rows) == {"dev-a", "dev-b"}
        assert rows["dev-a"].state is not None and rows["dev-a"].state.selected_model == "m3"
        assert rows["dev-b"].state is not None and rows["dev-b"].state.selected_model == "m2"
    finally:
        store.close()


def test_record_statuses_writes_many_in_one_call(tmp_path: Path) -> None:
    store = HubStore(tmp_path / "hub.db")
    try:
        store.record_statuses([("dev-a", False), ("dev-b", True)], now=10.0)
        store.record_statuses([("dev-a", True)], now=11.0)
        rows = {d.device: (d.online, d.seen) for d in store.devices()}
        assert rows == {"dev-a": (True, 11.0), "dev-b": (True, 10.0)}
    finally:
        store.close()
