"""What a stolen device key can do at the broker (issue 15, high #2, medium #3, #8): the shipped
mosquitto.conf, mosquitto/acl and the plugin mosquitto/edge_acl.c, on a real Mosquitto, with
certificates from :mod:`hub.sync.certs`.

A device writes only its uplink topics (``repo/blobs/get``, ``devices/<id>/{state,status,audit,
events}``), reads only its downlink ones (``repo/meta/#``, ``devices/<id>/{blobs,audit/ack}``),
never publishes a retained message, never sends more than a topic's cap, and never joins a shared
subscription; an identity that is not a well-formed, unreserved device id, or a device whose client
id is not its CN, can do nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleet.errors import PublishRefused, SubscribeRefused
from fleet.messages import Incoming, Outgoing
from fleet.mqtt import MqttClient
from hub.sync.certs import issue
from tests.sync.broker import Broker


async def connected(broker: Broker, cn: str, **kw: object) -> MqttClient:
    client = MqttClient(broker.client_config(cn, **kw))  # type: ignore[arg-type]
    await client.start()
    await client.wait_connected(10)
    return client


@contextlib.asynccontextmanager
async def device(broker: Broker, cn: str = "dev-a", **kw: object) -> AsyncIterator[MqttClient]:
    client = await connected(broker, cn, **kw)
    try:
        yield client
    finally:
        await client.close(end_session=True)


class Inbox:
    def __init__(self) -> None:
        self.messages: list[Incoming] = []

    def __call__(self, msg: Incoming) -> None:
        self.messages.append(msg)


KIB = 1024

# (topic, payload size, retained): every one must be answered PUBACK 0x87 (not authorized)
REFUSED_PUBLISH = [
    pytest.param("edge/v1/devices/dev-a/audit/ack", 40, False, id="write-own-audit-ack"),
    pytest.param("edge/v1/devices/dev-a/blobs", 40, False, id="write-own-chunk-replies"),
    pytest.param("edge/v1/devices/dev-a/commands", 40, False, id="own-subtree-unknown-topic"),
    pytest.param("edge/v1/devices/dev-a/audit/ack/x", 40, False, id="below-own-ack-topic"),
    pytest.param("edge/v1/devices/dev-a/state", 40, True, id="retained-state"),
    pytest.param("edge/v1/devices/dev-a/status", 40, True, id="retained-status"),
    pytest.param("edge/v1/devices/dev-a/audit", 40, True, id="retained-audit-batch"),
    pytest.param("edge/v1/devices/dev-a/state", 0, True, id="retained-empty-clear"),
    pytest.param("edge/v1/devices/dev-a/events", 32 * KIB, False, id="oversized-event"),
    pytest.param("edge/v1/devices/dev-a/status", 2 * KIB, False, id="oversized-status"),
    pytest.param("edge/v1/devices/dev-a/state", 512 * KIB, False, id="oversized-state"),
    pytest.param("edge/v1/devices/dev-a/audit", 9 * 1024 * KIB, False, id="oversized-audit-batch"),
    pytest.param("edge/v1/repo/blobs/get", 8 * KIB, False, id="oversized-chunk-request"),
    pytest.param("edge/v1/repo/meta/timestamp.json", 40, False, id="publish-repo-metadata"),
    pytest.param("edge/v1/devices/dev-b/events", 40, False, id="other-device-events"),
]


@pytest.mark.parametrize(("topic", "size", "retain"), REFUSED_PUBLISH)
async def test_device_publish_refused(broker: Broker, topic: str, size: int, retain: bool) -> None:
    async with device(broker) as dev:
        with pytest.raises(PublishRefused) as err:
            await dev.publish(Outgoing(topic, b"x" * size, qos=1, retain=retain))
        assert err.value.reason_code == 0x87


ALLOWED_PUBLISH = [
    pytest.param("edge/v1/devices/dev-a/state", 200 * KIB, id="state"),
    pytest.param("edge/v1/devices/dev-a/status", 200, id="status"),
    pytest.param("edge/v1/devices/dev-a/events", 16 * KIB, id="event-at-its-cap"),
    pytest.param("edge/v1/devices/dev-a/audit", 4 * 1024 * KIB, id="audit-batch"),
    pytest.param("edge/v1/repo/blobs/get", 200, id="chunk-request"),
]


@pytest.mark.parametrize(("topic", "size"), ALLOWED_PUBLISH)
async def test_device_uplink_publish_allowed(broker: Broker, topic: str, size: int) -> None:
    async with device(broker) as dev:
        await dev.publish(Outgoing(topic, b"x" * size, qos=1))


REFUSED_SUBSCRIBE = [
    pytest.param("$share/hub/edge/v1/repo/blobs/get", id="join-hub-chunk-requests"),
    pytest.param("$share/hub/edge/v1/devices/+/audit", id="join-hub-audit-collection"),
    pytest.param("$share/hub/edge/v1/devices/+/events", id="join-hub-event-collection"),
    pytest.param("$share/own/edge/v1/devices/dev-a/blobs", id="shared-even-on-own-downlink"),
    pytest.param("edge/v1/devices/dev-a/state", id="read-own-uplink"),
    pytest.param("edge/v1/devices/dev-a/#", id="wildcard-own-subtree"),
    pytest.param("edge/v1/devices/+/audit/ack", id="wildcard-all-acks"),
    pytest.param("edge/v1/devices/dev-b/blobs", id="other-device-blobs"),
    pytest.param("edge/v1/repo/blobs/get", id="read-chunk-requests"),
    pytest.param("edge/v1/#", id="everything-under-prefix"),
    pytest.param("#", id="everything"),
]


@pytest.mark.parametrize("topic_filter", REFUSED_SUBSCRIBE)
async def test_device_subscribe_refused(broker: Broker, topic_filter: str) -> None:
    async with device(broker) as dev:
        with pytest.raises(SubscribeRefused) as err:
            await dev.subscribe(topic_filter, Inbox())
        assert err.value.reason_code == 0x87


@pytest.mark.parametrize(
    "topic_filter",
    [
        pytest.param("edge/v1/repo/meta/#", id="repo-metadata"),
        pytest.param("edge/v1/devices/dev-a/blobs", id="own-chunk-replies"),
        pytest.param("edge/v1/devices/dev-a/audit/ack", id="own-audit-acks"),
    ],
)
async def test_device_downlink_subscribe_allowed(broker: Broker, topic_filter: str) -> None:
    async with device(broker) as dev:
        await dev.subscribe(topic_filter, Inbox())


@pytest.fixture(scope="module")
def odd_identities(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Client certificates from the fleet CA for CNs that are no device: reserved names and a
    malformed id (written beside copies of the session's CA, never over its files)."""
    out = tmp_path_factory.mktemp("odd-pki")
    for cn in ("ca", "broker", "Dev_Upper"):
        issue(broker.certdir, cn, dest=out, any_name=True)
    return out


@pytest.mark.parametrize("cn", ["ca", "broker", "Dev_Upper"])
async def test_reserved_or_malformed_identity_can_do_nothing(
    broker: Broker, odd_identities: Path, cn: str
) -> None:
    config = dataclasses.replace(
        broker.client_config("dev-a"),
        client_id=cn,
        cert_file=odd_identities / f"{cn}.crt",
        key_file=odd_identities / f"{cn}.key",
    )
    client = MqttClient(config)
    await client.start()
    await client.wait_connected(10)
    try:
        with pytest.raises(PublishRefused):
            await client.publish(Outgoing(f"edge/v1/devices/{cn}/state", b"{}", qos=1))
        with pytest.raises(SubscribeRefused):
            await client.subscribe("edge/v1/repo/meta/#", Inbox())
    finally:
        await client.close(end_session=True)


async def test_a_client_id_other_than_the_cn_is_replaced_by_the_cn(broker: Broker) -> None:
    """On the device listener the broker replaces the asked client id by the CN
    (``use_username_as_clientid``) before the plugin's "client id = CN" rule would see it: the
    certificate of dev-a asking to be dev-b stays dev-a, and dev-b's connection is untouched."""
    async with device(broker, "dev-b") as victim, device(broker, "dev-a", client_id="dev-b") as dev:
        await dev.publish(Outgoing("edge/v1/devices/dev-a/state", b"{}", qos=1))  # its own uplink
        with pytest.raises(PublishRefused):
            await dev.publish(Outgoing("edge/v1/devices/dev-b/state", b"{}", qos=1))
        await asyncio.sleep(0.5)
        assert victim.is_connected


async def test_refused_share_join_takes_nothing_from_the_hub_under_load(broker: Broker) -> None:
    """Medium #3 with counts: a device that tries to join the hub's shared event subscription is
    refused (SUBACK 0x87), so the broker assigns it nothing; every one of 300 events another device
    sends reaches the hub worker."""
    topic = "edge/v1/devices/+/events"
    hub = await connected(broker, "hub", client_id="hub-share-count")
    got = Inbox()
    await hub.subscribe(f"$share/hub/{topic}", got, qos=1)
    thief_inbox = Inbox()
    try:
        async with device(broker, "dev-a") as thief, device(broker, "dev-b") as sender:
            with pytest.raises(SubscribeRefused):
                await thief.subscribe(f"$share/hub/{topic}", thief_inbox, qos=1)
            for i in range(300):
                await sender.publish(Outgoing("edge/v1/devices/dev-b/events", str(i).encode(), qos=1))
            for _ in range(100):
                if len(got.messages) >= 300:
                    break
                await asyncio.sleep(0.05)
        assert sorted(int(m.payload) for m in got.messages) == list(range(300))
        assert thief_inbox.messages == []
    finally:
        await hub.close(end_session=True)


async def test_a_retained_last_will_is_dropped_and_a_plain_one_arrives(broker: Broker) -> None:
    """Mosquitto checks the Will against the ACL when it sends it: a retained Will from a device is
    dropped, so the agent's Will is not retained (fleet.messages.offline_will)."""
    hub = await connected(broker, "hub", client_id="hub-will")
    inbox = Inbox()
    await hub.subscribe("edge/v1/devices/+/status", inbox, qos=1)
    try:
        for cn, retain in (("dev-b", True), ("dev-c", False)):
            will = Outgoing(
                f"edge/v1/devices/{cn}/status", f'{{"device":"{cn}","online":false}}'.encode(), 1, retain
            )
            dev = await connected(broker, cn, will=will, keepalive_s=2)
            sock = dev._client.socket()
            assert sock is not None
            sock.close()  # a crash: the broker sends the Will
            await asyncio.sleep(1.0)
            await dev.close()
        await asyncio.sleep(2.0)
        senders = {m.topic.split("/")[3] for m in inbox.messages}
        assert "dev-c" in senders and "dev-b" not in senders
    finally:
        await hub.close(end_session=True)
