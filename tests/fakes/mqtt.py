"""An in-memory MQTT broker and client (the :class:`fleet.mqtt.MqttClient` seam), for sync unit tests.

:class:`FakeBroker` keeps what the tests need of MQTT 5: retained messages (delivered on subscribe,
cleared by an empty retained payload), topic filters with ``+`` and ``#``, shared subscriptions
(``$share/<group>/<filter>``: each message to one member of the group, round robin), persistent
sessions (a disconnected client's QoS 1 messages are queued and delivered on reconnect, unless it
ended its session), a Last Will published when a client drops without closing, and a per-client
``refuse`` set of topic filters whose publishes get reason code 0x87 (an ACL). :meth:`drop` and
:meth:`restart` disconnect clients the way a vanished broker does.

:class:`FakeMqttClient` has the public interface of :class:`fleet.mqtt.MqttClient` (``start``,
``wait_connected``, ``publish``, ``publish_nowait``/``wait_ack``, ``subscribe``, ``unsubscribe``,
``on_connect``, ``close``, ``is_connected``, ``connects``) and runs on the test's event loop: a
publish is acknowledged after the broker has routed it, handlers run as the real client's do (on
the loop). Pass ``client_factory=broker.client`` where a ``MqttClient`` factory is taken.

The real-broker tests (tests/sync/broker.py, a Mosquitto with the shipped config) remain the
end-to-end ones: TLS, ACLs, CRLs and broker restarts are only real there.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import NotConnected, PublishRefused
from fleet.messages import Incoming, Outgoing
from fleet.mqtt import ACK_MODES, MqttConfig

Handler = Callable[[Incoming], Any]
NOT_AUTHORIZED = 0x87


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching: ``+`` one level, ``#`` the rest (and the parent level)."""
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


def _split_share(topic_filter: str) -> tuple[str | None, str]:
    if topic_filter.startswith("$share/"):
        _, group, rest = topic_filter.split("/", 2)
        return group, rest
    return None, topic_filter


@dataclass
class _Session:
    client_id: str
    filters: dict[str, int] = field(default_factory=dict)
    queue: deque[Incoming] = field(default_factory=deque)
    client: FakeMqttClient | None = None


class FakeBroker:
    """The broker: sessions by client id, retained messages, shared-subscription cursors."""

    def __init__(self) -> None:
        self.retained: dict[str, Incoming] = {}
        self.sessions: dict[str, _Session] = {}
        self.refuse: dict[str, set[str]] = {}
        """client id -> topic filters it may not publish to (answered with 0x87)."""
        self.published: list[tuple[str, Outgoing]] = []
        """(client id, message) of every accepted publish, in order."""
        self.up = True
        self._cursors: dict[tuple[str, str], itertools.count[int]] = {}

    def client(self, config: MqttConfig) -> FakeMqttClient:
        """A client for ``config.client_id`` (the ``client_factory`` of the sync service)."""
        return FakeMqttClient(self, config)

    # --- connections ---------------------------------------------------------------------------

    def _connect(self, client: FakeMqttClient) -> bool:
        """Attach ``client``; True when its session was kept (session present)."""
        session = self.sessions.get(client.config.client_id)
        present = session is not None
        if session is None:
            session = self.sessions[client.config.client_id] = _Session(client.config.client_id)
        elif session.client is not None and session.client is not client:
            session.client._lost()  # a second connection with the same id takes over
        session.client = client
        return present

    def _release(self, client: FakeMqttClient, *, end_session: bool, will: bool) -> None:
        session = self.sessions.get(client.config.client_id)
        if session is None or session.client is not client:
            return
        session.client = None
        if end_session:
            del self.sessions[client.config.client_id]
        if will and client.config.will is not None:
            self.route(client.config.client_id, client.config.will)

    def drop(self, client_id: str) -> None:
        """The connection of ``client_id`` breaks (its Last Will is published; the session stays)."""
        session = self.sessions.get(client_id)
        if session is not None and session.client is not None:
            client = session.client
            self._release(client, end_session=False, will=True)
            client._lost()

    async def restart(self, down_s: float = 0.0) -> None:
        """Every connection breaks; clients reconnect after ``down_s`` (sessions and retained kept)."""
        self.up = False
        for session in list(self.sessions.values()):
            if session.client is not None:
                self.drop(session.client_id)
        await asyncio.sleep(down_s)
        self.up = True  # the clients reconnect by themselves (FakeMqttClient._lost schedules it)

    # --- routing -------------------------------------------------------------------------------

    def route(self, sender: str, msg: Outgoing) -> None:
        self.published.append((sender, msg))
        incoming = Incoming(
            msg.topic, msg.payload, msg.qos, False, msg.response_topic, msg.correlation, tuple(msg.user)
        )
        if msg.retain:
            if msg.payload:
                self.retained[msg.topic] = Incoming(
                    msg.topic,
                    msg.payload,
                    msg.qos,
                    True,
                    msg.response_topic,
                    msg.correlation,
                    tuple(msg.user),
                )
            else:
                self.retained.pop(msg.topic, None)
        shared: dict[tuple[str, str], list[_Session]] = {}
        for session in self.sessions.values():
            for topic_filter in session.filters:
                group, plain = _split_share(topic_filter)
                if not matches(plain, msg.topic):
                    continue
                if group is None:
                    self._deliver(session, incoming)
                else:
                    shared.setdefault((group, plain), []).append(session)
        for key, members in shared.items():
            members.sort(key=lambda s: s.client_id)
            live = [m for m in members if m.client is not None] or members
            cursor = self._cursors.setdefault(key, itertools.count())
            self._deliver(live[next(cursor) % len(live)], incoming)

    def _deliver(self, session: _Session, msg: Incoming) -> None:
        if session.client is not None:
            session.client._receive(msg)
        elif msg.qos >= 1:
            session.queue.append(msg)

    def _subscribe(self, client: FakeMqttClient, topic_filter: str, qos: int) -> None:
        session = self.sessions[client.config.client_id]
        session.filters[topic_filter] = qos
        group, plain = _split_share(topic_filter)
        if group is None:
            for topic, msg in sorted(self.retained.items()):
                if matches(plain, topic):
                    client._receive(msg)

    def _unsubscribe(self, client: FakeMqttClient, topic_filter: str) -> None:
        session = self.sessions.get(client.config.client_id)
        if session is not None:
            session.filters.pop(topic_filter, None)

    def _flush_queue(self, client: FakeMqttClient) -> None:
        session = self.sessions[client.config.client_id]
        while session.queue:
            client._receive(session.queue.popleft())


class FakeMqttClient:
    """The :class:`fleet.mqtt.MqttClient` interface over a :class:`FakeBroker` (module docstring)."""

    def __init__(self, broker: FakeBroker, config: MqttConfig) -> None:
        self.broker = broker
        self.config = config
        self._subs: dict[str, tuple[int, Handler]] = {}
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._hooks: list[Callable[[bool], Awaitable[None]]] = []
        self._started = False
        self._closing = False
        self._mids = itertools.count(1)
        self._acks: dict[int, int] = {}
        self._reconnect: asyncio.Task[None] | None = None
        self.connects = 0
        self.last_error: str | None = None

    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    def on_connect(self, hook: Callable[[bool], Awaitable[None]]) -> None:
        self._hooks.append(hook)

    async def start(self) -> None:
        if not self._started:
            self._started = True
            self._reconnect = asyncio.get_running_loop().create_task(self._connect_loop())

    async def _connect_loop(self) -> None:
        while not self._closing and not self.broker.up:
            await asyncio.sleep(max(0.01, self.config.backoff_min_s))
        if self._closing:
            return
        present = self.broker._connect(self)
        self._disconnected.clear()
        self._connected.set()
        self.connects += 1
        for topic_filter, (qos, _) in list(self._subs.items()):
            self.broker._subscribe(self, topic_filter, qos)
        self.broker._flush_queue(self)
        for hook in list(self._hooks):
            await hook(present)

    def _lost(self) -> None:
        """The broker dropped this connection: reconnect in the background, as the real client does."""
        self._connected.clear()
        self._disconnected.set()
        if not self._closing:
            self._reconnect = asyncio.get_running_loop().create_task(self._connect_loop())

    def _receive(self, msg: Incoming) -> None:
        for topic_filter, (_, handler) in list(self._subs.items()):
            if matches(_split_share(topic_filter)[1], msg.topic):
                result = handler(msg)
                if asyncio.iscoroutine(result):
                    asyncio.get_running_loop().create_task(result)

    async def wait_connected(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise NotConnected(f"not connected to {self.config.host}:{self.config.port} (fake)") from None

    async def wait_disconnected(self) -> None:
        await self._disconnected.wait()

    def _check(self, msg: Outgoing) -> int:
        if not self._connected.is_set():
            raise NotConnected("not connected")
        refused = self.broker.refuse.get(self.config.client_id, set())
        if any(matches(f, msg.topic) for f in refused):
            return NOT_AUTHORIZED
        self.broker.route(self.config.client_id, msg)
        return 0

    async def publish(self, msg: Outgoing, *, timeout: float | None = None) -> None:
        rc = self._check(msg)
        await asyncio.sleep(0)  # the acknowledgement comes back through the loop
        if rc >= 0x80:
            raise PublishRefused(f"publish to {msg.topic} refused (reason code {rc:#x})", reason_code=rc)

    def publish_nowait(self, msg: Outgoing) -> int:
        mid = next(self._mids)
        self._acks[mid] = self._check(msg)
        return mid

    async def wait_ack(self, mid: int, timeout: float | None = None) -> None:
        await asyncio.sleep(0)
        rc = self._acks.pop(mid, 0)
        if rc >= 0x80:
            raise PublishRefused(f"publish refused (reason code {rc:#x})", reason_code=rc)

    async def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        qos: int = 1,
        timeout: float | None = None,
        ack: str = "received",
    ) -> None:
        """As :meth:`fleet.mqtt.MqttClient.subscribe`; the fake broker models no PUBACK to a
        subscriber (it delivers each message once), so both ``ack`` modes behave alike here."""
        if ack not in ACK_MODES:
            raise ValueError(f"subscribe: ack must be one of {', '.join(ACK_MODES)}, not {ack!r}")
        self._subs[topic_filter] = (qos, handler)
        if self._connected.is_set():
            self.broker._subscribe(self, topic_filter, qos)

    async def unsubscribe(self, topic_filter: str, *, timeout: float | None = None) -> None:
        self._subs.pop(topic_filter, None)
        if self._connected.is_set():
            self.broker._unsubscribe(self, topic_filter)

    async def close(self, *, timeout: float = 5.0, end_session: bool = False) -> None:
        self._closing = True
        if self._reconnect is not None and not self._reconnect.done():
            self._reconnect.cancel()
        if self._connected.is_set():
            self.broker._release(self, end_session=end_session, will=False)
        self._connected.clear()
        self._disconnected.set()


__all__ = ["FakeBroker", "FakeMqttClient", "matches"]
