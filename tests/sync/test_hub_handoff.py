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
import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg
import pytest

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


@dataclass
class Setup:
    """Two ``edge-hub serve`` workers (the first leads), one device with sealed records, its uploader."""

    store: HubStore
    log: AuditLog
    hubs: list[subprocess.Popen[bytes]]
    hub_logs: list[Path]
    records: int
    client: MqttClient | None = None
    uploader: AuditUploader | None = None

    async def upload(self, broker: Broker) -> AuditUploader:
        key_hex = self.store.audit_keys("dev-a")[0]
        self.client = MqttClient(broker.client_config("dev-a"))
        await self.client.start()
        await self.client.wait_connected(10)
        self.uploader = AuditUploader(
            self.client, self.log, "dev-a", key_hex, batch_size=50, window=8, ack_timeout_s=NEVER_S
        )
        await self.uploader.start()
        return self.uploader

    def all_stored_once(self) -> None:
        assert self.uploader is not None and self.uploader.timeouts == 0  # the hub, not the device
        assert self.store.audit_count("dev-a") == (self.records, self.records)
        assert self.store.verify_device("dev-a") == (self.records, [])

    def registered(self) -> list[str]:
        return [w[0] for w in WorkerRegistry(self.store.db).all()]

    async def close(self) -> None:
        if self.uploader is not None:
            await self.uploader.close()
        if self.client is not None:
            await self.client.close()
        self.log.close()
        for hub in self.hubs:
            stop(hub)
        self.store.close()


@contextlib.asynccontextmanager
async def two_workers(
    broker: Broker, tmp_path: Path, db: str | Path, prefix: str, records: int, extra: tuple[str, ...] = ()
) -> AsyncIterator[Setup]:
    repo = new_repo(tmp_path / "repo")
    store = HubStore(db)
    key = DeviceKey.generate()
    store.register_key("dev-a", key.public.raw.hex())
    setup = Setup(store, new_log(tmp_path / "audit.db", key, records), [], [], records)
    try:
        for i in range(2):
            setup.hub_logs.append(tmp_path / f"hub{i}.log")
            setup.hubs.append(spawn_hub(broker, repo.path, db, f"{prefix}{i}", setup.hub_logs[i], extra))
            await asyncio.to_thread(wait_serving, setup.hubs[i], setup.hub_logs[i])
        yield setup
    finally:
        await setup.close()


async def test_a_worker_stopped_while_holding_batches_stores_them_before_it_leaves(
    own_broker: Broker, tmp_path: Path, pg_cluster: Any
) -> None:
    url: str = pg_cluster.new_database()
    async with two_workers(own_broker, tmp_path, url, "hub-t", 2000) as setup:
        blocker = psycopg.connect(url)
        try:
            blocker.execute("SELECT device FROM devices WHERE device = 'dev-a' FOR UPDATE")
            await setup.upload(own_broker)
            await wait_for(lambda: lock_waiters(url) >= 2, 60, "both workers blocked in their store")
            leaver = setup.hubs[1]
            leaver.send_signal(signal.SIGTERM)
            await asyncio.sleep(8.0)  # longer than the 5 s the worker used to wait before ending its session
            assert leaver.poll() is None, "the worker leaves only once it handled what it holds"
            blocker.rollback()
        finally:
            blocker.close()
        assert await asyncio.to_thread(leaver.wait, 40) == 0
        text = setup.hub_logs[1].read_text()
        assert '"mqtt_left"' in text and '"complete": true' in text, text[-2000:]
        await wait_for(lambda: setup.log.backlog() == 0, 120, "every record acknowledged")
        setup.all_stored_once()
        assert setup.registered() == ["hub-t0"]  # the leaver's row went with its session


@pytest.mark.parametrize(
    "victim", [pytest.param(1, id="kill-the-other-worker"), pytest.param(0, id="kill-the-leader")]
)
async def test_a_killed_worker_never_restarted_is_taken_over_by_the_leader(
    own_broker: Broker, tmp_path: Path, hub_db: str | Path, victim: int
) -> None:
    """The survivor (the leader, or the worker that becomes it) takes the dead one's session over."""
    async with two_workers(own_broker, tmp_path, hub_db, "hub-r", 3000, STALE) as setup:
        await setup.upload(own_broker)
        await wait_for(lambda: setup.store.audit_count("dev-a")[0] >= 300, 60, "a tenth stored")
        setup.hubs[victim].send_signal(signal.SIGKILL)
        await asyncio.to_thread(setup.hubs[victim].wait, 10)
        await wait_for(lambda: setup.log.backlog() == 0, 120, "every record acknowledged")
        setup.all_stored_once()
        survivor = setup.hub_logs[1 - victim].read_text()
        assert '"hub_worker_gone"' in survivor and f'"hub-r{victim}"' in survivor
        assert '"outcome": "ended"' in survivor, survivor[-3000:]
        await wait_for(
            lambda: setup.registered() == [f"hub-r{1 - victim}"], 30, "the gone worker's row deleted"
        )


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
