"""The persistent event outbox: bounded and counted, survives restarts and kill -9, and end to end
with a real Mosquitto: events reported while the broker is down, through a service restart, reach
the hub exactly once."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.engine.pool import ModelPool
from agent.sync.errors import LedgerError
from agent.sync.ledger import Ledger
from agent.sync.outbox import Outbox
from agent.sync.service import SyncOptions, SyncService
from fleet.messages import Event
from hub.sync.serve import HubServer, ServeConfig
from hub.sync.store import HubStore
from tests.sync.broker import REPO, Broker
from tests.sync.helpers import enrolled_device, new_repo, wait_for


def event(i: int) -> Event:
    return Event("deployment", "load_failed", f"models/m/{i}", f"event {i}", 1000.0 + i)


def test_append_persists_and_survives_reopen(tmp_path: Path) -> None:
    ledger = Ledger.open(tmp_path)
    box = Outbox(ledger)
    stored = [box.append(event(i)) for i in range(5)]
    assert len({e.id for e in stored}) == 5 and all(e.id for e in stored)
    box.acked(stored[0].id)
    ledger.close()
    again = Outbox(Ledger.open(tmp_path))
    assert again.pending() == stored[1:]
    assert len(again) == 4 and again.dropped == 0


def test_full_outbox_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    box = Outbox(Ledger.open(tmp_path), capacity=3)
    stored = [box.append(event(i)) for i in range(7)]
    assert box.pending() == stored[4:]
    assert box.dropped == 4
    box.append(event(7))
    assert Outbox(Ledger.open(tmp_path), capacity=3).dropped == 5  # persisted


def test_same_id_is_held_once(tmp_path: Path) -> None:
    box = Outbox(Ledger.open(tmp_path))
    first = box.append(event(1))
    box.append(first)
    assert box.pending() == [first]


BAD_OUTBOXES = [
    pytest.param("capacity-zero", "outbox capacity must be at least 1, got 0", id="capacity-zero"),
    pytest.param("capacity-negative", "outbox capacity must be at least 1, got -5", id="capacity-negative"),
    pytest.param("ledger-is-a-directory", "cannot open the sync ledger", id="ledger-is-a-directory"),
    pytest.param("ledger-not-sqlite", "sync ledger", id="ledger-not-sqlite"),
]


@pytest.mark.parametrize(("case", "message"), BAD_OUTBOXES)
def test_bad_outbox_is_a_clear_error(tmp_path: Path, case: str, message: str) -> None:
    path = tmp_path / "sync" / "ledger.db"
    if case.startswith("capacity"):
        with pytest.raises(ValueError, match=message):
            Outbox(Ledger.open(tmp_path), capacity=-5 if "negative" in case else 0)
        return
    path.parent.mkdir(parents=True)
    if case == "ledger-is-a-directory":
        path.mkdir()
    else:
        path.write_bytes(b"this is not a database, just some bytes " * 100)
    with pytest.raises(LedgerError, match=message):
        Outbox(Ledger.open(tmp_path)).append(event(1))


WRITER = """
import sys
from pathlib import Path
from agent.sync.ledger import Ledger
from fleet.messages import Event
from agent.sync.outbox import Outbox

box = Outbox(Ledger.open(Path(sys.argv[1])))
start = len(box)
i = 0
while True:
    box.append(Event("deployment", "activated", f"models/m/{start + i}", "x" * 1500, float(start + i)))
    if i == 0:
        print("go", flush=True)
    i += 1
"""


def test_kill9_mid_write_keeps_every_committed_event_and_no_torn_one(tmp_path: Path) -> None:
    rnd = random.Random(7)
    for _round in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"go\n"
        time.sleep(rnd.uniform(0.05, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        events = Outbox(Ledger.open(tmp_path)).pending(1_000_000)
        # Every event decodes (no torn one) and the sequence has no hole: what committed stayed.
        assert [e.at for e in events] == [float(i) for i in range(len(events))]
        assert all(e.detail == "x" * 1500 for e in events)
    assert len(events) > 5


@pytest.mark.parametrize(
    ("ids", "stored"),
    [
        pytest.param(["a", "a"], 1, id="same-id-twice"),
        pytest.param(["a", "b"], 2, id="two-ids"),
        pytest.param(["", ""], 2, id="no-id-legacy-kept"),
    ],
)
def test_hub_stores_an_event_id_once(tmp_path: Path, ids: list[str], stored: int) -> None:
    store = HubStore(tmp_path / "hub.db")
    event = Event("deployment", "activated", "models/m/1", "", 5.0)
    new = [store.record_event("dev-a", dataclasses.replace(event, id=i)) for i in ids]
    assert new.count(True) == stored  # what the hub's on_event callback (deploy --wait) is told
    assert store.record_event("dev-b", Event("deployment", "activated", "models/m/1", "", 5.0, "a"))
    assert len(store.events("dev-a")) == stored
    assert len(store.events("dev-b")) == 1


def test_hub_database_without_event_ids_is_upgraded(tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "hub.db"
    conn = sqlite3.connect(db)
    conn.execute(
        "CREATE TABLE events (id INTEGER PRIMARY KEY, device TEXT NOT NULL, kind TEXT NOT NULL,"
        " status TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL)"
    )
    conn.execute(
        "INSERT INTO events (device, kind, status, target, detail, at) VALUES ('d', 'k', 's', '', '', 1)"
    )
    conn.commit()
    conn.close()
    store = HubStore(db)
    store.record_event("d", Event("k", "s2", "", "", 2.0, "x"))
    store.record_event("d", Event("k", "s2", "", "", 2.0, "x"))
    assert [e.status for _, e in store.events("d")] == ["s2", "s"]


@pytest.mark.slow
async def test_events_reported_offline_survive_a_restart_and_arrive_once(
    own_broker: Broker, tmp_path: Path
) -> None:
    repo = new_repo(tmp_path / "repo")
    repo.publish()
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")
    hub = HubServer(
        ServeConfig(repo.path, tmp_path / "hub.db", own_broker.client_config("hub"), meta_poll_s=0.3)
    )
    await hub.start()
    store = hub.store
    assert store is not None
    own_broker.stop()
    options = SyncOptions(
        "dev-a", own_broker.client_config("dev-a"), refresh_interval_s=2.0, state_interval_s=1.0
    )
    pool = ModelPool()
    try:
        first = SyncService(options, tmp_path / "dev", pool)
        await first.start()
        for i in range(3):
            await first.report(event(i))
        assert first.events_sent == []
        await first.close()

        second = SyncService(options, tmp_path / "dev", pool)
        await second.start()
        for i in range(3, 5):
            await second.report(event(i))
        assert len(second.outbox) == 5
        own_broker.start()
        try:
            await wait_for(lambda: len(store.events("dev-a")) >= 5, 60, "5 events at the hub")
            await asyncio.sleep(1.0)  # anything sent twice would show by now
            got = sorted(e.target for _, e in store.events("dev-a"))
            assert got == [f"models/m/{i}" for i in range(5)]
            assert len(second.outbox) == 0
        finally:
            await second.close()
    finally:
        await hub.close()
        await pool.close()
