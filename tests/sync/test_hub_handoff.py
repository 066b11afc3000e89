"""A hub worker that stops hands over what the broker gave it (issue 19), against a real Mosquitto,
real ``edge-hub serve`` processes and both hub stores:

- stopped with SIGTERM while it holds batches it cannot store yet (the device's row locked), it
  leaves its subscriptions, stores what it holds once it can, and only then ends its session;
- killed (SIGKILL) and never started again, its persistent session keeps receiving its share of
  the batches; the leader notices its registry row going stale and takes the session over
  (hub/sync/rescue.py): every record is stored once.

The device's ack timeout is 10 minutes here (``NEVER_S``): recovery must come from the hub, a test
that passed through the device re-sending would run past its own deadline.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import psutil
import psycopg

from agent.audit import AuditLog
from agent.sync.audit_upload import AuditUploader
from fleet.device_key import DeviceKey
from fleet.mqtt import MqttClient
from hub.sync.store import HubStore
from hub.sync.workers import WorkerRegistry
from tests.sync.broker import Broker
from tests.sync.helpers import new_repo, wait_for
from tests.sync.hub_workers import spawn_hub, stop, wait_serving
from tests.sync.test_hub_ack import NEVER_S, lock_waiters, new_log

STALE = ("--worker-stale", "5")


async def upload(
    broker: Broker, store: HubStore, log: AuditLog, key: DeviceKey
) -> tuple[MqttClient, AuditUploader]:
    client = MqttClient(broker.client_config("dev-a"))
    await client.start()
    await client.wait_connected(10)
    uploader = AuditUploader(
        client, log, "dev-a", key.public.raw.hex(), batch_size=50, window=8, ack_timeout_s=NEVER_S
    )
    await uploader.start()
    return client, uploader


async def test_a_worker_stopped_while_holding_batches_stores_them_before_it_leaves(
    own_broker: Broker, tmp_path: Path, pg_cluster: Any
) -> None:
    url: str = pg_cluster.new_database()
    repo = new_repo(tmp_path / "repo")
    store = HubStore(url)
    key = DeviceKey.generate()
    store.register_key("dev-a", key.public.raw.hex())
    records = 2000
    log = new_log(tmp_path / "audit.db", key, records)
    blocker = psycopg.connect(url)
    blocker.execute("SELECT device FROM devices WHERE device = 'dev-a' FOR UPDATE")
    hub_logs = [tmp_path / f"hub{i}.log" for i in range(2)]
    hubs = []
    client: MqttClient | None = None
    uploader: AuditUploader | None = None
    try:
        for i in range(2):
            hubs.append(spawn_hub(own_broker, repo.path, url, f"hub-t{i}", hub_logs[i]))
            await asyncio.to_thread(wait_serving, hubs[i], hub_logs[i])
        client, uploader = await upload(own_broker, store, log, key)
        await wait_for(lambda: lock_waiters(url) >= 2, 60, "both workers blocked in their store")
        hubs[1].send_signal(signal.SIGTERM)
        await asyncio.sleep(8.0)  # longer than the 5 s the worker used to wait before ending its session
        assert hubs[1].poll() is None, "the worker leaves only once it handled what it holds"
        blocker.rollback()
        assert await asyncio.to_thread(hubs[1].wait, 40) == 0
        text = hub_logs[1].read_text()
        assert '"mqtt_left"' in text and '"complete": true' in text, text[-2000:]
        await wait_for(lambda: log.backlog() == 0, 120, "every record acknowledged")
        assert uploader.timeouts == 0
        assert store.audit_count("dev-a") == (records, records)
        assert store.verify_device("dev-a") == (records, [])
        assert [w[0] for w in WorkerRegistry(store.db).all()] == ["hub-t0"]  # the leaver's row went
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


async def test_a_killed_worker_never_restarted_is_taken_over_by_the_leader(
    own_broker: Broker, tmp_path: Path, hub_db: str | Path
) -> None:
    db = hub_db
    repo = new_repo(tmp_path / "repo")
    store = HubStore(db)
    key = DeviceKey.generate()
    store.register_key("dev-a", key.public.raw.hex())
    records = 3000
    log = new_log(tmp_path / "audit.db", key, records)
    hub_logs = [tmp_path / f"hub{i}.log" for i in range(2)]
    hubs = []
    client: MqttClient | None = None
    uploader: AuditUploader | None = None
    try:
        for i in range(2):  # the first started leads
            hubs.append(spawn_hub(own_broker, repo.path, db, f"hub-r{i}", hub_logs[i], STALE))
            await asyncio.to_thread(wait_serving, hubs[i], hub_logs[i])
        client, uploader = await upload(own_broker, store, log, key)
        await wait_for(lambda: store.audit_count("dev-a")[0] >= records // 10, 60, "a tenth stored")
        hubs[1].send_signal(signal.SIGKILL)
        await asyncio.to_thread(hubs[1].wait, 10)
        await wait_for(lambda: log.backlog() == 0, 120, "every record acknowledged")
        assert uploader.timeouts == 0
        assert store.audit_count("dev-a") == (records, records)
        assert store.verify_device("dev-a") == (records, [])
        leader = hub_logs[0].read_text()
        assert '"hub_worker_gone"' in leader and '"hub-r1"' in leader
        assert '"outcome": "ended"' in leader, leader[-3000:]
        await wait_for(
            lambda: [w[0] for w in WorkerRegistry(store.db).all()] == ["hub-r0"], 30, "the gone worker's row"
        )
    finally:
        if uploader is not None:
            await uploader.close()
        if client is not None:
            await client.close()
        log.close()
        for hub in hubs:
            stop(hub)
        store.close()


def blob_children(pid: int) -> list[psutil.Process]:
    """The live blob workers of hub ``pid`` (not a killed one its parent has not reaped yet)."""
    out = []
    for p in psutil.Process(pid).children():
        try:
            if "hub.sync.worker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:  # a zombie or gone
            continue
    return out


async def test_blob_workers_are_restarted_and_do_not_outlive_their_parent(
    broker: Broker, tmp_path: Path
) -> None:
    """A blob worker that dies is started again (same client id: it resumes its session); one
    whose ``edge-hub serve`` is killed exits too (no orphan fighting the next one for its id)."""
    repo = new_repo(tmp_path / "repo")
    log = tmp_path / "hub.log"
    hub = spawn_hub(broker, repo.path, tmp_path / "hub.db", "hub-bw", log, ("--blob-workers", "1"))
    try:
        await asyncio.to_thread(wait_serving, hub, log)
        await wait_for(lambda: len(blob_children(hub.pid)) == 1, 30, "the blob worker")
        first = blob_children(hub.pid)[0]
        assert "hub-bw-blobs-0" in first.cmdline()
        first.kill()
        await wait_for(
            lambda: [c.pid for c in blob_children(hub.pid)] not in ([], [first.pid]), 30, "a new blob worker"
        )
        second = blob_children(hub.pid)[0]
        assert "hub-bw-blobs-0" in second.cmdline()
        assert '"hub_blob_worker_exited"' in log.read_text()
        hub.send_signal(signal.SIGKILL)
        await asyncio.to_thread(hub.wait, 10)
        await asyncio.to_thread(second.wait, 30)  # psutil: raises TimeoutExpired if it outlives its parent
    finally:
        stop(hub)
