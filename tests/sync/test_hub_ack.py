"""The hub acknowledges an audit batch to the broker only once it is done with it (issue 19), against
a real Mosquitto, real PostgreSQL and real ``edge-hub serve`` processes:

- a worker killed (SIGKILL) while it holds batches un-acknowledged, then started again with the
  same client id, gets them again from the broker: every record is stored once and the device is
  acknowledged without ever reaching its ack timeout (set to 10 minutes here, so the test could
  only pass through the timeout by running past its own deadline);
- a store whose database is unavailable is retried un-acknowledged, then answered ``retry``; the
  device sends again after ``retry_after`` and is acknowledged;
- batches held out of order are acknowledged to the broker once held, so more of them than the
  broker's in-flight window for the hub never stall the delivery of the batch they wait for.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.audit import AuditLog
from agent.sync.audit_upload import AuditUploader
from fleet.chain import GENESIS, seal_all
from fleet.device_key import DeviceKey
from fleet.messages import AuditAck, Incoming, Outgoing, device_topic
from fleet.mqtt import MqttClient
from hub.sync.collect import Collector
from hub.sync.store import HubStore
from tests.sync.broker import Broker
from tests.sync.helpers import new_repo, wait_for
from tests.sync.hub_workers import spawn_hub, stop, wait_serving
from tests.sync.test_audit_sync import batch_of, entries

NEVER_S = 600.0
"""The devices' ack timeout in these tests: recovery must come from the hub, not from it."""


def new_log(path: Path, key: DeviceKey, records: int) -> AuditLog:
    log = AuditLog(path, key=key, max_bytes=1 << 30)
    log.start()
    for f in [log.submit(e) for e in entries(records)]:
        f.result(60)
    return log


def lock_waiters(url: str) -> int:
    """Backends of the database ``url`` waiting for a lock (a worker blocked on a device row)."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'"
        ).fetchone()
        assert row is not None
        return int(row[0])


@pytest.mark.parametrize(
    "workers",
    [
        pytest.param(1, id="the-only-worker-killed-and-restarted"),
        pytest.param(2, id="one-of-two-workers-killed-and-restarted"),
    ],
)
async def test_a_worker_killed_holding_unacked_batches_gets_them_again(
    own_broker: Broker, tmp_path: Path, pg_cluster: Any, workers: int
) -> None:
    url: str = pg_cluster.new_database()
    repo = new_repo(tmp_path / "repo")
    store = HubStore(url)
    key = DeviceKey.generate()
    store.register_key("dev-a", key.public.raw.hex())
    records = 2000
    log = new_log(tmp_path / "audit.db", key, records)
    # The device's row locked: every worker that takes a batch of dev-a blocks inside its store,
    # the batch received and not acknowledged to the broker.
    blocker = psycopg.connect(url)
    blocker.execute("SELECT device FROM devices WHERE device = 'dev-a' FOR UPDATE")
    hub_logs = [tmp_path / f"hub{i}.log" for i in range(workers)]
    hubs = []
    client: MqttClient | None = None
    uploader: AuditUploader | None = None
    try:
        for i in range(workers):
            hubs.append(spawn_hub(own_broker, repo.path, url, f"hub-k{i}", hub_logs[i]))
            await asyncio.to_thread(wait_serving, hubs[i], hub_logs[i])
        client = MqttClient(own_broker.client_config("dev-a"))
        await client.start()
        await client.wait_connected(10)
        uploader = AuditUploader(
            client, log, "dev-a", key.public.raw.hex(), batch_size=100, window=4, ack_timeout_s=NEVER_S
        )
        await uploader.start()
        # worker 0 holds a batch (blocked on the row); with two workers, both may
        await wait_for(lambda: lock_waiters(url) >= 1, 60, "a worker blocked in its store")
        hubs[0].send_signal(signal.SIGKILL)
        await asyncio.to_thread(hubs[0].wait, 10)
        blocker.rollback()  # the database is free again; the killed worker's batches are not stored
        hubs[0] = spawn_hub(own_broker, repo.path, url, "hub-k0", hub_logs[0])  # same client id
        await asyncio.to_thread(wait_serving, hubs[0], hub_logs[0])
        await wait_for(lambda: log.backlog() == 0, 180, "every record acknowledged")
        assert uploader.timeouts == 0  # acknowledged by the hub, never through the device's timeout
        assert uploader.retries == 0
        assert store.audit_count("dev-a") == (records, records)
        assert store.verify_device("dev-a") == (records, [])
    finally:
        if uploader is not None:
            await uploader.close()
        if client is not None:
            await client.close()
        blocker.close()
        log.close()
        for hub in hubs:
            stop(hub)
        store.close()


def set_connectable(admin_url: str, db: str, allowed: bool) -> None:
    """Open or close database ``db`` to connections (closing also ends the open ones): the hub
    sees what it sees while PostgreSQL restarts."""
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {db} ALLOW_CONNECTIONS {'true' if allowed else 'false'}")
        if not allowed:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (db,))


@pytest.mark.parametrize(
    ("store_retry_s", "answered_retry"),
    [
        pytest.param(0.5, True, id="outage-longer-than-the-hubs-own-retries-answers-retry"),
        pytest.param(120.0, False, id="outage-within-the-hubs-own-retries-costs-only-the-delay"),
    ],
)
async def test_an_unavailable_database_is_retried_and_answered_retry(
    own_broker: Broker, tmp_path: Path, pg_cluster: Any, store_retry_s: float, answered_retry: bool
) -> None:
    url: str = pg_cluster.new_database()
    db = url.split("@/", 1)[1].split("?", 1)[0]
    admin = pg_cluster.url()
    store = HubStore(url)
    key = DeviceKey.generate()
    store.register_key("dev-a", key.public.raw.hex())
    records = 500
    log = new_log(tmp_path / "audit.db", key, records)
    hub = MqttClient(own_broker.client_config("hub"))
    dev = MqttClient(own_broker.client_config("dev-a"))
    for c in (hub, dev):
        await c.start()
        await c.wait_connected(10)
    collector = Collector(hub, store)
    collector.store_retry_s = store_retry_s
    await collector.start()
    uploader = AuditUploader(
        dev, log, "dev-a", key.public.raw.hex(), batch_size=100, window=4, ack_timeout_s=NEVER_S
    )
    try:
        await asyncio.to_thread(set_connectable, admin, db, False)
        await uploader.start()
        if answered_retry:
            await wait_for(lambda: uploader.retries >= 1, 60, "a retry answered and acted on")
        else:
            await wait_for(lambda: collector.store_failures >= 1, 60, "a store failed")
        await asyncio.to_thread(set_connectable, admin, db, True)
        await wait_for(lambda: log.backlog() == 0, 120, "every record acknowledged")
        assert uploader.timeouts == 0
        assert (uploader.retries > 0) == answered_retry
        assert (collector.retries_answered > 0) == answered_retry
        assert store.audit_count("dev-a") == (records, records)
        assert store.verify_device("dev-a") == (records, [])
    finally:
        await asyncio.to_thread(set_connectable, admin, db, True)
        await uploader.close()
        for c in (dev, hub):
            await c.close()
        log.close()
        store.close()


@pytest.mark.parametrize(
    ("window", "held"),
    [
        pytest.param(2, 6, id="six-held-batches-through-a-window-of-two"),
        pytest.param(1, 7, id="seven-held-batches-through-a-window-of-one"),
    ],
)
async def test_held_batches_are_acked_to_the_broker_so_their_predecessor_gets_through(
    own_broker: Broker, hub_db: str | Path, window: int, held: int
) -> None:
    """The device's batches arrive last first: each is held (ahead of its predecessor) and must be
    acknowledged to the broker at once, or the window fills with batches that wait for one the
    broker cannot send."""
    key = DeviceKey.generate()
    store = HubStore(hub_db)
    store.register_key("dev-a", key.public.raw.hex())
    size = 10
    rows = seal_all(entries(size * (held + 1)), 0, GENESIS, time.time())
    batches = [batch_of(key, rows[i : i + size]) for i in range(0, len(rows), size)]
    hub = MqttClient(own_broker.client_config("hub", receive_maximum=window))
    dev = MqttClient(own_broker.client_config("dev-a"))
    acks: list[AuditAck] = []

    def on_ack(msg: Incoming) -> None:
        acks.append(AuditAck.decode(msg.payload))

    for c in (hub, dev):
        await c.start()
        await c.wait_connected(10)
    await dev.subscribe(device_topic("dev-a", "audit/ack"), on_ack, qos=1)
    collector = Collector(hub, store)
    await collector.start()
    try:
        for batch in reversed(batches):
            await dev.publish(Outgoing(device_topic("dev-a", "audit"), batch.encode(), qos=1))
        await wait_for(lambda: any(a.up_to_seq == len(rows) for a in acks), 60, "the whole chain acked")
        assert sum("held" in a.detail for a in acks) == held
        assert hub.acks_deferred == held + 1
        assert store.audit_count("dev-a") == (len(rows), len(rows))
        assert store.verify_device("dev-a") == (len(rows), [])
    finally:
        for c in (dev, hub):
            await c.close()
        store.close()
