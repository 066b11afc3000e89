"""Two real ``edge-hub serve`` workers on one broker and one PostgreSQL database share the devices'
audit batches (shared subscription); one is killed with SIGKILL in the middle of the load: every
record arrives exactly once (the devices re-send what no worker acknowledged, the store holds
(device, seq) once), each chain verifies, and the survivor takes the leader's role."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from agent.audit import AuditLog
from agent.sync.audit_upload import AuditUploader
from fleet.device_key import DeviceKey
from fleet.mqtt import MqttClient
from hub.sync.store import HubStore
from tests.sync.broker import Broker
from tests.sync.helpers import new_repo, wait_for
from tests.sync.hub_workers import spawn_hub, stop, wait_serving
from tests.sync.test_audit_sync import entries

DEVICES = ("dev-a", "dev-b", "dev-c")
RECORDS = 3000


@pytest.mark.parametrize(
    "victim",
    [
        pytest.param(0, id="kill-the-leader"),
        pytest.param(1, id="kill-the-other-worker"),
    ],
)
async def test_a_worker_killed_mid_load_loses_and_duplicates_nothing(
    broker: Broker, tmp_path: Path, pg_cluster: object, victim: int
) -> None:
    url: str = pg_cluster.new_database()  # type: ignore[attr-defined]
    repo = new_repo(tmp_path / "repo")
    store = HubStore(url)
    logs: dict[str, AuditLog] = {}
    for device in DEVICES:
        key = DeviceKey.generate()
        store.register_key(device, key.public.raw.hex())
        log = AuditLog(tmp_path / f"{device}.db", key=key, max_bytes=1 << 30)
        log.start()
        for f in [log.submit(e) for e in entries(RECORDS)]:
            f.result(60)
        logs[device] = log
    hub_logs = [tmp_path / f"hub{i}.log" for i in range(2)]
    hubs = []
    for i in range(2):  # the first started takes the leader's role
        hubs.append(spawn_hub(broker, repo.path, url, f"hub-w{i}-{victim}", hub_logs[i]))
        await asyncio.to_thread(wait_serving, hubs[i], hub_logs[i])
    assert "hub_leader" in hub_logs[0].read_text()
    clients, uploaders = [], []
    try:
        for device in DEVICES:
            client = MqttClient(broker.client_config(device, client_id=f"{device}-{victim}"))
            await client.start()
            await client.wait_connected(10)
            key_hex = store.audit_keys(device)[0]
            up = AuditUploader(
                client, logs[device], device, key_hex, batch_size=100, window=4, ack_timeout_s=3.0
            )
            await up.start()
            clients.append(client)
            uploaders.append(up)

        def stored() -> int:
            return sum(store.audit_count(d)[0] for d in DEVICES)

        await wait_for(lambda: stored() >= len(DEVICES) * RECORDS // 4, 60, "a quarter of the records")
        hubs[victim].send_signal(signal.SIGKILL)
        hubs[victim].wait(10)
        killed_at = stored()
        await wait_for(lambda: all(logs[d].backlog() == 0 for d in DEVICES), 180, "every record acknowledged")
        assert killed_at < len(DEVICES) * RECORDS  # the kill happened mid-load
        for device in DEVICES:
            assert store.audit_count(device) == (RECORDS, RECORDS), device
            assert store.verify_device(device) == (RECORDS, []), device
            assert store.devices()[DEVICES.index(device)].problem is None
        survivor = hub_logs[1 - victim]
        await wait_for(lambda: "hub_leader" in survivor.read_text(), 30, "the survivor leads")
    finally:
        for up in uploaders:
            await up.close()
        for client in clients:
            await client.close()
        for log in logs.values():
            log.close()
        for hub in hubs:
            stop(hub)
        store.close()
    _ = time
