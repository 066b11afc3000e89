"""What one device identity can make the broker hold (issue 15, medium #8), on a real Mosquitto
with the shipped config: an offline device's queue is capped in bytes; payload caps per topic and
the ban on retained messages are in tests/security/test_broker_acl.py."""

from __future__ import annotations

import asyncio
import re

from fleet.messages import Incoming, Outgoing
from fleet.mqtt import MqttClient
from tests.sync.broker import REPO, Broker

MIB = 1 << 20


def shipped(setting: str) -> str:
    conf = (REPO / "mosquitto" / "mosquitto.conf").read_text()
    match = re.search(rf"^{setting} (\S+)$", conf, re.MULTILINE)
    assert match, setting
    return match.group(1)


def test_the_shipped_limits() -> None:
    assert int(shipped("max_queued_bytes")) == 64 * MIB
    assert int(shipped("max_queued_messages")) <= 10_000
    assert shipped("persistent_client_expiration") == "14d"
    assert int(shipped("max_packet_size")) == 16 * MIB


async def test_an_offline_device_queue_is_capped_in_bytes(own_broker: Broker) -> None:
    """100 replies of 1 MiB for a device whose session is kept while it is away: the broker keeps
    at most 64 MiB of them (plus what was in flight), not 100 MiB."""
    topic = "edge/v1/devices/dev-c/blobs"
    dev = MqttClient(own_broker.client_config("dev-c"))
    await dev.start()
    await dev.wait_connected(10)
    got: list[Incoming] = []
    await dev.subscribe(topic, got.append, qos=1)
    await dev.close()  # leaves the persistent session (expiry 7 days) with its subscription
    hub = MqttClient(own_broker.client_config("hub", client_id="hub-flood"))
    await hub.start()
    await hub.wait_connected(10)
    try:
        for i in range(100):
            await hub.publish(Outgoing(topic, bytes([i % 256]) * MIB, qos=1))
    finally:
        await hub.close(end_session=True)
    dev = MqttClient(own_broker.client_config("dev-c"))
    try:
        await dev.subscribe(topic, got.append, qos=1)
        await dev.start()
        await dev.wait_connected(10)
        for _ in range(100):
            before = len(got)
            await asyncio.sleep(0.3)
            if got and len(got) == before:
                break
        assert 0 < len(got) <= 64 + 64, len(got)  # queue cap + max_inflight_messages
        assert len(got) < 100
    finally:
        await dev.close(end_session=True)
