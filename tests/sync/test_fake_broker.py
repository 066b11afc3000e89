"""The in-memory MQTT seam (tests/fakes/mqtt.py) behaves as the sync code relies on: named cases."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from fleet.errors import NotConnected, PublishRefused
from fleet.messages import Incoming, Outgoing
from fleet.mqtt import MqttConfig
from tests.fakes.mqtt import FakeBroker, matches


def config(client_id: str, will: Outgoing | None = None) -> MqttConfig:
    path = Path("/nonexistent")
    return MqttConfig("fake", 0, client_id, path, path, path, backoff_min_s=0.01, will=will)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        pytest.param("a/b", "a/b", True, id="exact"),
        pytest.param("a/+/c", "a/x/c", True, id="plus"),
        pytest.param("a/+", "a/x/c", False, id="plus-one-level"),
        pytest.param("a/#", "a/x/c", True, id="hash"),
        pytest.param("a/#", "a", True, id="hash-parent"),
        pytest.param("a/b", "a/c", False, id="other"),
    ],
)
def test_topic_matching(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected


async def test_retained_messages_reach_late_subscribers_and_an_empty_one_clears() -> None:
    broker = FakeBroker()
    hub, dev = broker.client(config("hub")), broker.client(config("dev"))
    for c in (hub, dev):
        await c.start()
        await c.wait_connected(1)
    await hub.publish(Outgoing("meta/root.json", b"v1", retain=True))
    got: list[Incoming] = []
    await dev.subscribe("meta/#", got.append)
    assert [(m.payload, m.retain) for m in got] == [(b"v1", True)]
    await hub.publish(Outgoing("meta/root.json", b"", retain=True))
    assert "meta/root.json" not in broker.retained


async def test_a_shared_subscription_gives_each_message_to_one_member() -> None:
    broker = FakeBroker()
    seen: dict[str, list[bytes]] = {"w1": [], "w2": []}
    workers = {name: broker.client(config(name)) for name in seen}
    for name, w in workers.items():
        await w.start()
        await w.wait_connected(1)
        await w.subscribe("$share/hub/requests", lambda m, n=name: seen[n].append(m.payload))
    dev = broker.client(config("dev"))
    await dev.start()
    await dev.wait_connected(1)
    for i in range(6):
        await dev.publish(Outgoing("requests", str(i).encode()))
    assert sorted(seen["w1"] + seen["w2"]) == [str(i).encode() for i in range(6)]
    assert len(seen["w1"]) == len(seen["w2"]) == 3


async def test_a_persistent_session_gets_what_came_while_it_was_away_and_the_will_fires() -> None:
    broker = FakeBroker()
    will = Outgoing("devices/dev/state", b"offline", retain=True)
    dev, hub = broker.client(config("dev", will)), broker.client(config("hub"))
    got: list[bytes] = []
    await dev.subscribe("devices/dev/acks", lambda m: got.append(m.payload))
    for c in (dev, hub):
        await c.start()
        await c.wait_connected(1)
    broker.drop("dev")
    assert not dev.is_connected
    assert broker.retained["devices/dev/state"].payload == b"offline"
    await hub.publish(Outgoing("devices/dev/acks", b"while-away"))
    await dev.wait_connected(1)
    assert got == [b"while-away"] and dev.connects == 2


async def test_a_refused_topic_and_a_closed_client_raise_as_the_real_client_does() -> None:
    broker = FakeBroker()
    broker.refuse["dev"] = {"devices/+/audit/ack"}
    dev = broker.client(config("dev"))
    await dev.start()
    await dev.wait_connected(1)
    with pytest.raises(PublishRefused) as err:
        await dev.publish(Outgoing("devices/dev/audit/ack", b"{}"))
    assert err.value.reason_code == 0x87
    await dev.close()
    with pytest.raises(NotConnected):
        await dev.publish(Outgoing("devices/dev/events", b"{}"))


async def test_a_broker_restart_reconnects_the_clients() -> None:
    broker = FakeBroker()
    dev = broker.client(config("dev"))
    await dev.start()
    await dev.wait_connected(1)
    await broker.restart(down_s=0.05)
    await asyncio.wait_for(dev.wait_connected(), 1)
    assert dev.connects == 2
