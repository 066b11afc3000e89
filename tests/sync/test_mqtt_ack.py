"""When :class:`fleet.mqtt.MqttClient` acknowledges a QoS 1 message to the broker, against a real
Mosquitto: ``ack="received"`` on arrival, ``ack="handled"`` after the handler; what the broker does
with un-acknowledged messages of a shared-subscription member that is killed (SIGKILL) and comes
back with the same client id (docs/protocol.md "Transport")."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from fleet.messages import Incoming, Outgoing
from fleet.mqtt import MqttClient
from tests.sync.broker import REPO, Broker
from tests.sync.helpers import wait_for


@contextlib.asynccontextmanager
async def connected(broker: Broker, cn: str, **kw: object) -> AsyncIterator[MqttClient]:
    client = MqttClient(broker.client_config(cn, **kw))  # type: ignore[arg-type]
    await client.start()
    await client.wait_connected(10)
    try:
        yield client
    finally:
        await client.close(end_session=True)


@pytest.mark.parametrize(
    ("ack", "delivered_while_handling"),
    [
        pytest.param("received", 6, id="received-acks-at-once"),
        pytest.param("handled", 2, id="handled-holds-the-window"),
    ],
)
async def test_handled_acks_leave_after_the_handler(
    broker: Broker, ack: str, delivered_while_handling: int
) -> None:
    """Receive maximum 2: handlers that do not return keep the broker from sending a third
    message only when their acks wait for them."""
    topic = f"edge/v1/test/{uuid.uuid4().hex[:12]}"
    release = asyncio.Event()
    got: list[bytes] = []

    async def handler(msg: Incoming) -> None:
        got.append(msg.payload)
        await release.wait()

    hub_id = f"hub-ack-{uuid.uuid4().hex[:8]}"
    async with (
        connected(broker, "hub", client_id=hub_id, receive_maximum=2) as hub,
        connected(broker, "operator", client_id=f"op-{uuid.uuid4().hex[:8]}") as op,
    ):
        await hub.subscribe(f"{topic}/#", handler, qos=1, ack=ack)  # type: ignore[arg-type]
        for i in range(6):
            await op.publish(Outgoing(f"{topic}/m", str(i).encode(), qos=1))
        await wait_for(lambda: len(got) >= delivered_while_handling, 30, "deliveries")
        await asyncio.sleep(1.0)  # nothing more arrives while the handlers hold their messages
        assert len(got) == delivered_while_handling
        release.set()
        await wait_for(lambda: len(got) == 6, 30, "every message once the handlers returned")
        assert sorted(got) == [str(i).encode() for i in range(6)]
        assert hub.acks_deferred == (6 if ack == "handled" else 0)
        assert hub.acks_stale == 0


class Member:
    """``tests/sync/ack_member.py`` in its own process; ``got`` fills as it prints."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.got: list[str] = []
        self.ready = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode().strip()
            if line == "ready":
                self.ready.set()
            elif line.startswith("got "):
                self.got.append(line[4:])

    @classmethod
    async def start(cls, broker: Broker, client_id: str, filter_: str, ack: str, *, hold: bool) -> Member:
        argv = [sys.executable, "-m", "tests.sync.ack_member", "--port", str(broker.service_port)]
        argv += ["--certdir", str(broker.certdir), "--client-id", client_id, "--filter", filter_]
        argv += ["--ack", ack, *(["--hold"] if hold else [])]
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, env={"PYTHONPATH": str(REPO)}, stdout=asyncio.subprocess.PIPE
        )
        member = cls(proc)
        await asyncio.wait_for(member.ready.wait(), 60)
        return member

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        await self._reader


@pytest.mark.parametrize(
    ("ack", "back_to_the_same_session"),
    [
        pytest.param("received", False, id="received-lost-with-the-process"),
        pytest.param("handled", True, id="handled-redelivered-to-the-same-session"),
    ],
)
async def test_a_killed_shared_member_gets_its_unacked_messages_again(
    own_broker: Broker, ack: str, back_to_the_same_session: bool
) -> None:
    """Mosquitto 2.0: a message of ``$share/<group>/...`` is given to one member's session; if that
    member dies before acknowledging it, the broker neither hands it to another member nor drops
    it: it is sent again (DUP) when the same client id reconnects (within the session expiry)."""
    broker = own_broker
    group = f"g{uuid.uuid4().hex[:8]}"
    topic = "edge/v1/test/shared"
    filter_ = f"$share/{group}/{topic}"
    other: list[str] = []

    async def on_other(msg: Incoming) -> None:
        other.append(msg.payload.decode())

    member = await Member.start(broker, "hub-member-a", filter_, ack, hold=True)
    again: Member | None = None
    try:
        async with (
            connected(broker, "hub", client_id="hub-member-b") as b,
            connected(broker, "operator", client_id="op-shared") as op,
        ):
            await b.subscribe(filter_, on_other, qos=1, ack="handled")
            sent = [f"m{i}" for i in range(10)]
            for payload in sent:
                await op.publish(Outgoing(topic, payload.encode(), qos=1))
            await wait_for(lambda: len(member.got) + len(other) == 10, 30, "all ten delivered")
            held = list(member.got)
            assert held, "the broker gave the killed member a share"
            await member.kill()
            await asyncio.sleep(1.0)  # the other member is not given the dead member's messages
            assert sorted(other + held) == sorted(sent)
            again = await Member.start(broker, "hub-member-a", filter_, ack, hold=False)
            if back_to_the_same_session:
                await wait_for(lambda: sorted(again.got) == sorted(held), 30, "held messages again")  # type: ignore[union-attr]
            else:
                await asyncio.sleep(2.0)
                assert again.got == []
            assert sorted(other) == sorted(set(sent) - set(held))
    finally:
        await member.kill()
        if again is not None:
            await again.kill()
    _ = Path


async def test_leave_hands_new_messages_to_the_others_and_handles_what_was_queued(broker: Broker) -> None:
    """Receive maximum 2, handlers held: most of a's share waits queued at the broker. After
    ``leave()`` every new message goes to b, and a still handles (and acknowledges) its whole share."""
    group = f"g{uuid.uuid4().hex[:8]}"
    topic = f"edge/v1/test/{uuid.uuid4().hex[:12]}"
    filter_ = f"$share/{group}/{topic}"
    release = asyncio.Event()
    got_a: list[str] = []
    got_b: list[str] = []

    async def on_a(msg: Incoming) -> None:
        got_a.append(msg.payload.decode())
        await release.wait()

    async def on_b(msg: Incoming) -> None:
        got_b.append(msg.payload.decode())

    async with (
        connected(broker, "hub", client_id=f"hub-la-{group}", receive_maximum=2) as a,
        connected(broker, "hub", client_id=f"hub-lb-{group}") as b,
        connected(broker, "operator", client_id=f"op-{group}") as op,
    ):
        await a.subscribe(filter_, on_a, qos=1, ack="handled")
        await b.subscribe(filter_, on_b, qos=1, ack="handled")
        first = [f"m{i}" for i in range(20)]
        for payload in first:
            await op.publish(Outgoing(topic, payload.encode(), qos=1))
        await wait_for(lambda: len(got_a) == 2 and len(got_b) == 10, 30, "a holds two, b has its share")
        leaving = asyncio.create_task(a.leave(quiet_s=0.5, timeout=30))
        await asyncio.sleep(0.5)
        later = [f"n{i}" for i in range(6)]
        for payload in later:
            await op.publish(Outgoing(topic, payload.encode(), qos=1))
        await wait_for(lambda: len(got_b) == 16, 30, "every later message at b")
        release.set()
        left = await leaving
        assert left.complete
        assert sorted(got_a + got_b) == sorted(first + later)
        assert len(got_a) == 10 and left.handled == 8  # a's share: 2 held + 8 queued at the broker
        assert a.acks_deferred == 10 and a.acks_stale == 0
