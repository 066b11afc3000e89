"""The outbox's fsyncing writes stay off the event loop (it also streams tokens), the hub's acks
are deleted in a few transactions (not one per event), and report() never waits behind a backlog
flush - while an event is still on disk before report() returns and leaves the outbox only after
the hub acknowledged storing it.

A real Mosquitto, a real hub collector and store, a real ledger file; SQLite's own statement trace
says which thread ran each COMMIT and how many there were."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from agent.engine.pool import ModelPool
from agent.sync.service import SyncOptions, SyncService
from fleet.messages import Event
from fleet.mqtt import MqttClient
from hub.sync.collect import Collector
from hub.sync.store import HubStore
from tests.sync.broker import Broker
from tests.sync.helpers import wait_for


@asynccontextmanager
async def collecting(broker: Broker, db: Path) -> AsyncIterator[HubStore]:
    """A hub worker storing events and acknowledging them, as ``edge-hub serve`` does."""
    client = MqttClient(broker.client_config("hub", client_id=f"hub-collect-{db.parent.name}"[:60]))
    await client.start()
    await client.wait_connected(10)
    store = HubStore(db)
    await Collector(client, store).start()
    try:
        yield store
    finally:
        await client.close(end_session=True)


def event(i: int) -> Event:
    return Event("deployment", "activated", f"models/m/{i}", "serving", float(i + 1))


class Trace:
    """The thread and text of every statement the ledger's connection runs."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.statements: list[tuple[int, str]] = []
        conn.set_trace_callback(self._record)

    def _record(self, sql: str) -> None:
        self.statements.append((threading.get_ident(), sql))

    def commits(self) -> list[int]:
        return [t for t, sql in self.statements if sql.strip().upper() == "COMMIT"]


def on_disk(path: Path, event_id: str) -> bool:
    """Read by another connection: only committed rows are visible."""
    conn = sqlite3.connect(path)
    try:
        return bool(conn.execute("SELECT COUNT(*) FROM outbox WHERE id = ?", (event_id,)).fetchone()[0])
    finally:
        conn.close()


async def test_outbox_writes_run_off_the_loop_and_acks_are_batched(broker: Broker, tmp_path: Path) -> None:
    loop_thread = threading.get_ident()
    sync = SyncService(SyncOptions("dev-a", broker.client_config("dev-a")), tmp_path, ModelPool())
    trace = Trace(sync.ledger.conn)
    try:
        for i in range(250):  # not connected yet: the events wait in the outbox
            await sync.report(event(i))
        appends = trace.commits()
        assert len(appends) == 250 and loop_thread not in appends
        assert len(sync.outbox) == 250

        trace.statements.clear()
        async with collecting(broker, tmp_path / "hub.db") as store:
            await sync.client.start()
            await sync.client.subscribe("edge/v1/devices/dev-a/events/ack", sync._on_events_ack, qos=1)
            await sync.client.wait_connected(30)
            await sync._flush_events()
            await wait_for(lambda: len(sync.outbox) == 0, 60, "the hub's acks")
            assert len(store.events("dev-a")) == 250
        assert [e.target for e in sync.events_sent] == [f"models/m/{i}" for i in range(250)]
        acks = trace.commits()
        # acks of a burst deleted together, not one per event: on average at least five a commit
        # (how many arrive together depends on the machine's pace; CI saw 35 commits, here ~10)
        assert 1 <= len(acks) <= 50
        assert loop_thread not in acks
    finally:
        await sync.close()


async def test_report_does_not_wait_behind_a_backlog_flush(broker: Broker, tmp_path: Path) -> None:
    sync = SyncService(SyncOptions("dev-b", broker.client_config("dev-b")), tmp_path, ModelPool())
    try:
        with sync.ledger.tx() as conn:  # a backlog from a long time offline, in one transaction
            conn.executemany(
                "INSERT INTO outbox (id, body) VALUES (?, ?)",
                [(f"{i:032x}", replace(event(i), id=f"{i:032x}").encode()) for i in range(2000)],
            )
        assert sync.outbox.pending(1)[0].id == f"{0:032x}"
        async with collecting(broker, tmp_path / "hub.db"):
            await sync.client.start()
            await sync.client.subscribe("edge/v1/devices/dev-b/events/ack", sync._on_events_ack, qos=1)
            await sync.client.wait_connected(30)
            sync._kick_flush()
            await wait_for(lambda: len(sync.events_sent) >= 10, 30, "the backlog flush under way")
            late = Event("deployment", "activated", "models/late/1", "serving", 1.0, "f" * 32)
            await sync.report(late)
            assert on_disk(sync.ledger.path, late.id)  # persisted before report() returned
            assert len(sync.outbox) > 1
            await wait_for(lambda: len(sync.outbox) == 0, 120, "the backlog and the late event flushed")
        assert sync.events_sent[-1].id == late.id  # oldest first, the late event last
        assert len(sync.events_sent) == 2001
    finally:
        await sync.close()
        await asyncio.sleep(0)
