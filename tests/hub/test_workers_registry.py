"""The hub workers' registry and the rule for declaring a worker gone (hub/sync/workers.py), on
both hub stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from hub.sync.store import HubStore
from hub.sync.workers import Watch, WorkerRegistry


@pytest.mark.parametrize(
    ("writes", "failed_at", "now", "may"),
    [
        pytest.param([0, 2, 4, 6, 8, 10, 12, 14], None, 15, True, id="watched-a-whole-stale-period"),
        pytest.param([0, 2, 4], None, 5, False, id="not-watched-long-enough"),
        pytest.param([0, 2, 10, 12, 14, 16], None, 17, False, id="own-gap-over-half-restarts-the-watch"),
        pytest.param([0, 2, 10, 12, 14, 16, 18, 20, 22, 24], None, 25, True, id="after-a-gap-a-whole-period"),
        pytest.param([0, 2, 4, 6, 8, 10, 12, 14], 14, 15, False, id="own-write-failed"),
        pytest.param([], None, 100, False, id="never-wrote"),
    ],
)
def test_watch_judges_only_after_watching_a_whole_stale_period(
    writes: list[float], failed_at: float | None, now: float, may: bool
) -> None:
    watch = Watch(stale_s=10.0)
    for t in writes:
        watch.wrote(t)
    if failed_at is not None:
        watch.failed()
    assert watch.may_judge(now) is may


def test_rows_renew_go_stale_and_are_deleted_only_while_still_stale(hub_db: str | Path) -> None:
    store = HubStore(hub_db)
    reg = WorkerRegistry(store.db)
    reg.seen("hub-a", "host-1", 10, 100.0)
    reg.seen("hub-b", "host-2", 20, 100.0)
    reg.seen("hub-a", "host-1", 11, 130.0)  # renewed (restarted: new pid)
    assert reg.all() == [("hub-a", "host-1", 11, 130.0), ("hub-b", "host-2", 20, 100.0)]
    assert reg.stale(120.0) == [("hub-b", "host-2", 20, 100.0)]
    reg.seen("hub-b", "host-2", 21, 140.0)  # came back while being taken over
    assert reg.gone("hub-b", before=120.0) is False
    assert [r[0] for r in reg.all()] == ["hub-a", "hub-b"]
    assert reg.gone("hub-b", before=150.0) is True
    assert reg.gone("hub-a") is True
    assert reg.all() == []
    assert reg.gone("hub-a") is False
    store.close()
