"""Found running two hub workers as docs/operations.md says (4.3.2, "Stopping and losing workers"):
the leader's take-over of a killed worker's session reports ``handled: 0`` although it stored
batches that session kept (the operator's only sign of what the take-over did).

Against a real Mosquitto and a real ``edge-hub serve``: one worker is killed (SIGKILL), a device
then uploads audit batches, which the broker keeps in that worker's session (its only member of
the share group); :func:`hub.sync.rescue.take_over` resumes the session, stores every record and
must count what it handled. The messages are delivered as soon as the session is resumed, before
:meth:`fleet.mqtt.MqttClient.leave` starts counting, so the count misses them.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from fleet.device_key import DeviceKey
from hub.sync.rescue import Outcome, take_over
from hub.sync.store import HubStore
from tests.sync.broker import Broker
from tests.sync.helpers import new_repo, wait_for
from tests.sync.hub_workers import spawn_hub, wait_serving
from tests.sync.test_hub_ack import new_log
from tests.sync.test_hub_handoff import Setup


@pytest.mark.parametrize("records", [pytest.param(100, id="two-batches-kept-by-a-killed-worker")])
async def test_the_take_over_counts_the_batches_it_stored(
    own_broker: Broker, tmp_path: Path, hub_db: str | Path, records: int
) -> None:
    repo = new_repo(tmp_path / "repo")
    store = HubStore(hub_db)
    key = DeviceKey.generate()
    store.register_key("dev-a", key.public.raw.hex())
    hub_log = tmp_path / "hub.log"
    hub = spawn_hub(own_broker, repo.path, hub_db, "hub-k0", hub_log)
    setup = Setup(store, new_log(tmp_path / "audit.db", key, records), [hub], [hub_log], records)
    try:
        await asyncio.to_thread(wait_serving, hub, hub_log)
        await wait_for(lambda: '"mqtt_connected"' in hub_log.read_text(), 30, "the worker's session")
        hub.send_signal(signal.SIGKILL)
        await asyncio.to_thread(hub.wait, 10)
        await setup.upload(own_broker)
        await asyncio.sleep(1.0)  # the batches reach the broker, which keeps them for hub-k0
        assert store.audit_count("dev-a")[0] == 0
        rescue = await take_over(
            own_broker.client_config("hub", client_id="hub-k0"), "hub-k0", store, repo.path
        )
        assert rescue.outcome is Outcome.ENDED
        await wait_for(lambda: setup.log.backlog() == 0, 60, "every record acknowledged")
        setup.all_stored_once()
        assert rescue.handled >= 2, "the take-over stored the kept batches but reports fewer handled"
    finally:
        await setup.close()
