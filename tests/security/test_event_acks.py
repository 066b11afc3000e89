"""Events stay in the device's outbox until the hub's application-level acknowledgement (issue 15,
medium #3): a PUBACK only says the broker has an event, and a broker may still lose it (a full
queue, a member of a shared subscription that cannot take it). Real Mosquitto, real ledger, the
real hub collector."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.engine.pool import ModelPool
from agent.sync.service import SyncOptions, SyncService
from fleet.messages import Event, EventAck, Outgoing
from fleet.mqtt import MqttClient
from hub.sync.collect import Collector
from hub.sync.store import HubStore
from tests.sync.broker import Broker
from tests.sync.helpers import wait_for

ACK = "edge/v1/devices/dev-c/events/ack"


def event(i: int) -> Event:
    return Event("deployment", "activated", f"models/m/{i}", "serving", float(i + 1))


async def service(broker: Broker, tmp_path: Path, **options: float) -> SyncService:
    sync = SyncService(SyncOptions("dev-c", broker.client_config("dev-c"), **options), tmp_path, ModelPool())  # type: ignore[arg-type]
    await sync.client.start()
    await sync.client.subscribe(ACK, sync._on_events_ack, qos=1)
    await sync.client.wait_connected(10)
    return sync


async def client(broker: Broker, cn: str, client_id: str) -> MqttClient:
    c = MqttClient(broker.client_config(cn, client_id=client_id))
    await c.start()
    await c.wait_connected(10)
    return c


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param(lambda ids: EventAck(("f" * 32,)).encode(), id="ack-naming-events-never-sent"),
        pytest.param(lambda ids: b'{"ids": "all"}', id="malformed-ack"),
        pytest.param(None, id="no-hub-at-all"),
    ],
)
async def test_a_pubacked_event_stays_until_the_hub_acknowledges_it(
    own_broker: Broker, tmp_path: Path, forged: object
) -> None:
    sync = await service(own_broker, tmp_path, event_ack_timeout_s=1.0)
    rogue = await client(own_broker, "operator", "rogue-acks")
    try:
        for i in range(5):
            await sync.report(event(i))
        await sync._flush_events()
        assert len(sync.events_sent) == 5  # every one PUBACKed by the broker
        if callable(forged):
            await rogue.publish(Outgoing(ACK, forged([e.id for e in sync.events_sent]), qos=1))
        await asyncio.sleep(1.5)
        assert len(sync.outbox) == 5  # still there: no hub stored them
        await sync._flush_events()  # overdue: sent again, same ids
        assert len(sync._awaiting) == 5
        # Now a hub comes: it stores them once and acknowledges; they leave the outbox.
        hub = await client(own_broker, "hub", "hub-late")
        store = HubStore(tmp_path / "hub.db")
        await Collector(hub, store).start()
        try:
            await asyncio.sleep(1.2)
            await sync._flush_events()
            await wait_for(lambda: len(sync.outbox) == 0, 20, "the hub's ack")
            assert len(store.events("dev-c")) == 5
        finally:
            await hub.close(end_session=True)
    finally:
        await rogue.close(end_session=True)
        await sync.close()


async def test_a_retained_ack_is_ignored(own_broker: Broker, tmp_path: Path) -> None:
    """A retained ack reaches a subscriber with the retain flag: it answers nothing sent now."""
    sync = SyncService(SyncOptions("dev-c", own_broker.client_config("dev-c")), tmp_path, ModelPool())
    await sync.client.start()
    await sync.client.wait_connected(10)
    operator = await client(own_broker, "operator", "retainer")
    try:
        await sync.report(Event("deployment", "activated", "models/m/1", "serving", 1.0, "e" * 32))
        await sync._flush_events()
        await operator.publish(Outgoing(ACK, EventAck(("e" * 32,)).encode(), qos=1, retain=True))
        await sync.client.subscribe(ACK, sync._on_events_ack, qos=1)  # gets it as a retained message
        await asyncio.sleep(1.0)
        assert len(sync.outbox) == 1
    finally:
        await operator.publish(Outgoing(ACK, b"", qos=1, retain=True))
        await operator.close(end_session=True)
        await sync.close()
