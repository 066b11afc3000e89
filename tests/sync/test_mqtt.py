"""The MQTT adapter against a real Mosquitto: TLS, ACLs, acks, Last Will, reconnect."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest

from fleet.errors import NotConnected, PublishRefused, SubscribeRefused
from fleet.messages import Incoming, Outgoing, device_topic, offline_will, parse_status
from fleet.mqtt import MqttClient, backoff_delay
from tests.sync.broker import Broker


async def connected(broker: Broker, cn: str, **kw: object) -> MqttClient:
    client = MqttClient(broker.client_config(cn, **kw))  # type: ignore[arg-type]
    await client.start()
    await client.wait_connected(10)
    return client


class Inbox:
    def __init__(self) -> None:
        self.messages: asyncio.Queue[Incoming] = asyncio.Queue()

    def __call__(self, msg: Incoming) -> None:
        self.messages.put_nowait(msg)

    async def get(self, timeout: float = 5.0) -> Incoming:
        return await asyncio.wait_for(self.messages.get(), timeout)


@contextlib.asynccontextmanager
async def hub_client(broker: Broker) -> AsyncIterator[MqttClient]:
    client = await connected(broker, "hub")
    try:
        yield client
    finally:
        await client.close()


def test_backoff_grows_and_is_bounded() -> None:
    highs = [backoff_delay(a, 0.5, 60.0, rand=lambda: 1.0) for a in range(12)]
    lows = [backoff_delay(a, 0.5, 60.0, rand=lambda: 0.0) for a in range(12)]
    assert highs[:4] == [0.5, 1.0, 2.0, 4.0]
    assert max(highs) == 60.0
    assert all(lo == 0.5 for lo in lows)


async def test_publish_subscribe_round_trip_with_properties(broker: Broker) -> None:
    async with hub_client(broker) as hub:
        dev = await connected(broker, "dev-a")
        inbox = Inbox()
        try:
            await dev.subscribe(device_topic("dev-a", "blobs"), inbox)
            await hub.publish(
                Outgoing(
                    device_topic("dev-a", "blobs"),
                    b"\x00\x01chunk",
                    correlation=b"abc:1",
                    user=(("status", "ok"),),
                )
            )
            msg = await inbox.get()
            assert msg.payload == b"\x00\x01chunk"
            assert msg.correlation == b"abc:1"
            assert msg.prop("status") == "ok"
        finally:
            await dev.close()


ACL_PUBLISH_CASES = [
    pytest.param("dev-a", "edge/v1/devices/dev-b/state", id="publish-other-device-state"),
    pytest.param("dev-a", "edge/v1/devices/dev-b/audit", id="publish-other-device-audit"),
    pytest.param("dev-a", "edge/v1/devices/dev-b/blobs", id="inject-chunk-to-other-device"),
    pytest.param("dev-a", "edge/v1/repo/meta/timestamp.json", id="publish-repo-metadata"),
    pytest.param("dev-a", "edge/v1/devices/dev-ab/state", id="id-with-own-id-as-prefix"),
]


@pytest.mark.parametrize(("cn", "topic"), ACL_PUBLISH_CASES)
async def test_device_cannot_publish_outside_its_subtree(broker: Broker, cn: str, topic: str) -> None:
    dev = await connected(broker, cn)
    try:
        with pytest.raises(PublishRefused) as err:
            await dev.publish(Outgoing(topic, b"{}", qos=1))
        assert err.value.reason_code == 0x87
    finally:
        await dev.close()


ACL_SUBSCRIBE_CASES = [
    pytest.param("edge/v1/devices/dev-b/blobs", id="read-other-device-blobs"),
    pytest.param("edge/v1/devices/dev-b/audit/ack", id="read-other-device-acks"),
    pytest.param("edge/v1/devices/+/state", id="wildcard-all-devices"),
    pytest.param("edge/v1/repo/blobs/get", id="read-chunk-requests"),
    pytest.param("$share/hub/edge/v1/repo/blobs/get", id="pose-as-hub-worker"),
    pytest.param("$share/hub/edge/v1/devices/+/audit", id="steal-audit-batches"),
    pytest.param("#", id="everything"),
]


@pytest.mark.parametrize("topic_filter", ACL_SUBSCRIBE_CASES)
async def test_device_cannot_read_as_another(broker: Broker, topic_filter: str) -> None:
    async with hub_client(broker) as hub:
        dev = await connected(broker, "dev-a")
        inbox = Inbox()
        try:
            try:
                await dev.subscribe(topic_filter, inbox)
            except SubscribeRefused as exc:
                assert exc.reason_code == 0x87
                return
            # Mosquitto's acl_file grants subscriptions and checks each delivery against the ACL:
            # nothing of dev-b's, no chunk request and no audit batch may arrive.
            await hub.publish(Outgoing("edge/v1/devices/dev-b/blobs", b"secret"))
            await hub.publish(Outgoing("edge/v1/devices/dev-b/state", b"secret"))
            for _ in range(4):  # several: a shared subscription would get its share of them
                await hub.publish(Outgoing("edge/v1/repo/blobs/get", b"{}"))
                await hub.publish(Outgoing("edge/v1/devices/dev-b/audit", b"{}"))
            await asyncio.sleep(0.5)
            received = []
            while not inbox.messages.empty():
                received.append(inbox.messages.get_nowait().topic)
            leaked = [t for t in received if "/devices/dev-b/" in t or t.endswith(("/blobs/get", "/audit"))]
            assert not leaked, f"dev-a received {leaked}"
        finally:
            # end the session: a granted shared subscription would otherwise outlive the test
            await dev.close(end_session=True)


async def test_client_id_cannot_impersonate(broker: Broker) -> None:
    """The identity is the certificate CN, not the client id: dev-a claiming 'dev-b' stays dev-a."""
    async with hub_client(broker):
        dev = await connected(broker, "dev-a", client_id="dev-b")
        try:
            with pytest.raises(PublishRefused):
                await dev.publish(Outgoing("edge/v1/devices/dev-b/state", b"{}"))
        finally:
            await dev.close()


async def test_last_will_marks_device_offline(broker: Broker) -> None:
    async with hub_client(broker) as hub:
        inbox = Inbox()
        await hub.subscribe("edge/v1/devices/dev-c/status", inbox)
        dev = await connected(broker, "dev-c", will=offline_will("dev-c"), keepalive_s=2)
        await dev.publish(Outgoing("edge/v1/devices/dev-c/status", b'{"device":"dev-c","online":true}'))
        while (await inbox.get()).payload != b'{"device":"dev-c","online":true}':
            pass
        # Drop the TCP connection without DISCONNECT: the broker must publish the will.
        sock = dev._client.socket()
        assert sock is not None
        sock.close()  # simulate a crash of the device
        msg = await inbox.get(timeout=10)
        assert parse_status(msg.payload) == ("dev-c", False)
        assert msg.retain is False and json.loads(msg.payload)["online"] is False
        await dev.close()


async def test_reconnects_after_broker_restart_and_resubscribes(own_broker: Broker) -> None:
    dev = await connected(own_broker, "dev-a")
    hub = await connected(own_broker, "hub")
    inbox = Inbox()
    try:
        await dev.subscribe(device_topic("dev-a", "blobs"), inbox)
        own_broker.restart(down_s=0.5)
        await asyncio.wait_for(dev.wait_disconnected(), 5)
        await dev.wait_connected(15)
        await hub.wait_connected(15)
        await asyncio.sleep(0.3)  # resubscription after connect
        await hub.publish(Outgoing(device_topic("dev-a", "blobs"), b"after-restart"))
        assert (await inbox.get(10)).payload == b"after-restart"
        assert dev.connects >= 2
    finally:
        await dev.close()
        await hub.close()


async def test_publish_while_disconnected_raises(own_broker: Broker) -> None:
    dev = await connected(own_broker, "dev-a")
    own_broker.stop()
    await asyncio.wait_for(dev.wait_disconnected(), 5)
    with pytest.raises(NotConnected):
        await dev.publish(Outgoing(device_topic("dev-a", "events"), b"x"))
    with pytest.raises(NotConnected):
        await dev.wait_connected(0.3)
    await dev.close()
