"""Hub side of the upward flows: audit batches, reported state, online status, events.

The device id always comes from the *topic* (the broker's ACL ties ``edge/v1/devices/<id>/...``
to the certificate whose CN is ``<id>``), never from the payload alone; a payload naming another
device is refused.

Audit batches arrive on the shared subscription ``$share/hub/edge/v1/devices/+/audit`` (several
hub workers may split them) and are stored one device at a time, in arrival order; the
acknowledgement goes to ``edge/v1/devices/<id>/audit/ack`` (never retained). With several
workers, a device's batches in flight are split between them by the broker, so a batch may reach
its worker before the batch ahead of it is stored by another: the store holds it as pending
(verified on its own) and the worker that stores the missing predecessor promotes it and
acknowledges the highest contiguous seq (hub/sync/store.py); no worker waits for another. Events arrive on
``$share/hub/.../events``; once an event is stored (or found already stored) its id is
acknowledged on ``edge/v1/devices/<id>/events/ack`` (:class:`~fleet.messages.EventAck`, the ids
of a short moment together), and only then does it leave the device's outbox. State and status are
read with a plain subscription (state reports written in batches, the newest per device:
hub/sync/latest.py); devices never retain them (the broker refuses a retained publish by
a device, mosquitto/edge_acl.c), so the store keeps the inventory across hub restarts and devices
send their state after every connect. A message that still arrives retained on a device topic (left
by an agent older than this rule) is recorded and then cleared.

Broker acknowledgements: the audit and event subscriptions are made with ``ack="handled"``
(fleet/mqtt.py), so the broker's PUBACK for a batch or an event leaves only after the handler is
done with it: stored (or held in ``audit_pending``, or found a duplicate) and answered, or refused
as invalid and answered. A worker killed before that leaves the message with the broker, which
delivers it again when the worker's session (same client id) reconnects. A held out-of-order batch
is acknowledged as soon as it is held (durably, in the database), so held batches never fill the
broker's in-flight window for this worker.

Database unavailable (PostgreSQL restarting, :class:`~hub.sync.db.DatabaseUnavailable`): the
handler keeps the message un-acknowledged and tries again for up to :data:`STORE_RETRY_S` (a
restart of a second or two costs the device nothing but the delay); if the database is still
unavailable, an audit batch is answered ``retry`` with ``retry_after`` = :data:`RETRY_AFTER_S` (the
device sends again from its mark then, instead of after its 30 s ack timeout) and an event is left
to the device's outbox (re-sent after its ack timeout). Any other failure is logged and not answered.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Callable
from typing import TypeVar

from fleet.errors import MqttError, ProtocolError
from fleet.log import get_logger
from fleet.messages import (
    MAX_ACK_IDS,
    PREFIX,
    AuditAck,
    AuditBatch,
    Event,
    EventAck,
    Incoming,
    Outgoing,
    StateReport,
    Status,
    device_of,
    device_topic,
    parse_status,
    shared,
)
from fleet.mqtt import MqttClient
from hub.sync.db import DatabaseUnavailable
from hub.sync.latest import LatestWriter
from hub.sync.store import HubStore

log = get_logger(__name__)

T = TypeVar("T")

ACK_DELAY_S = 0.05
"""Event ids stored within this long are acknowledged in one message."""

STORE_RETRY_S = 5.0
"""How long a handler keeps trying a store whose database is unavailable (the message stays
un-acknowledged to the broker meanwhile); each attempt may itself wait for a pooled connection
(:class:`~hub.sync.db.PostgresDatabase`'s ``acquire_timeout_s``)."""

ANSWER_WAIT_S = 10.0
"""How long an answer (audit ack, event ack) waits for the connection before it is given up."""

RETRY_AFTER_S = 2.0
"""The ``retry_after`` of a ``retry`` audit ack."""


class Collector:
    """Stores what devices send and acknowledges audit batches."""

    def __init__(
        self,
        client: MqttClient,
        store: HubStore,
        *,
        on_event: Callable[[str, Event], None] | None = None,
    ) -> None:
        self.client = client
        self.store = store
        self.on_event = on_event
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self.states: LatestWriter[str, StateReport] = LatestWriter(store.record_states, "device_state")
        """Reported states, the newest per device, written in batches (hub/sync/latest.py)."""
        self.statuses: LatestWriter[str, bool] = LatestWriter(store.record_statuses, "device_status")
        """Online/offline, likewise (one writer: a device's statuses are stored in arrival order;
        written each in its own thread, a Will's offline could land after the online that followed)."""
        self._acks: defaultdict[str, list[str]] = defaultdict(list)
        self._ack_tasks: dict[str, asyncio.Task[None]] = {}
        self.batches = 0
        self.store_failures = 0
        """Store attempts that found the database unavailable (each one retried or answered)."""
        self.retries_answered = 0
        """Audit batches answered ``retry`` (their database was unavailable)."""
        self.store_retry_s = STORE_RETRY_S
        self.retry_after_s = RETRY_AFTER_S

    async def start(self) -> None:
        audit, events = shared(f"{PREFIX}/devices/+/audit"), shared(f"{PREFIX}/devices/+/events")
        await self.client.subscribe(audit, self._on_audit, qos=1, ack="handled")
        await self.client.subscribe(events, self._on_event, qos=1, ack="handled")
        await self.client.subscribe(f"{PREFIX}/devices/+/state", self._on_state, qos=1)
        await self.client.subscribe(f"{PREFIX}/devices/+/status", self._on_status, qos=1)

    async def close(self, timeout: float = 5.0) -> None:
        """Write the states and statuses still pending (up to ``timeout`` each), then stop the writers."""
        for writer in (self.states, self.statuses):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(writer.flushed(), timeout)
            await writer.close()
            log.info("writer_stats", writer=writer.name, transactions=writer.writes, values=writer.values)

    async def _on_audit(self, msg: Incoming) -> None:
        try:
            device, _ = device_of(msg.topic)
        except ProtocolError:
            return
        arrived = asyncio.get_running_loop().time()
        async with self._locks[device]:
            started = asyncio.get_running_loop().time()
            try:
                batch = AuditBatch.decode(msg.payload)
                try:
                    ack = await self._with_retry(self.store.store_audit, device, batch)
                except DatabaseUnavailable as exc:
                    self.retries_answered += 1
                    ack = AuditAck(-1, Status.RETRY.value, str(exc)[:500], self.retry_after_s)
                log.info(
                    "audit_batch",
                    device=device,
                    first=batch.first_seq,
                    last=batch.last_seq,
                    up_to=ack.up_to_seq,
                    status=ack.status,
                    detail=ack.detail,
                    queued_s=round(started - arrived, 3),
                    store_s=round(asyncio.get_running_loop().time() - started, 3),
                )
            except ProtocolError as exc:
                ack = AuditAck(-1, Status.BAD_REQUEST.value, str(exc)[:500])
            self.batches += 1
            try:
                await self._answer(Outgoing(device_topic(device, "audit/ack"), ack.encode(), qos=1))
            except MqttError as exc:
                log.info("audit_ack_failed", device=device, error=str(exc))

    async def _answer(self, msg: Outgoing) -> None:
        """Publish an answer, waiting up to :data:`ANSWER_WAIT_S` for the connection first: a
        resumed session's messages are dispatched right after CONNACK, before the client reports
        itself connected (its subscriptions renewed), and their answers must not be lost then."""
        await self.client.wait_connected(ANSWER_WAIT_S)
        await self.client.publish(msg)

    async def _with_retry(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a thread, again while it raises :class:`DatabaseUnavailable`, for up to
        :attr:`store_retry_s`; the last DatabaseUnavailable is raised after that."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.store_retry_s
        delay = 0.1
        while True:
            try:
                return await asyncio.to_thread(fn, *args)
            except DatabaseUnavailable as exc:
                self.store_failures += 1
                left = deadline - loop.time()
                if left <= 0:
                    raise
                log.info("store_retry", error=str(exc)[:200], left_s=round(left, 1))
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 1.0)

    async def _on_state(self, msg: Incoming) -> None:
        try:
            device, _ = device_of(msg.topic)
            report = StateReport.decode(msg.payload)
        except ProtocolError as exc:
            log.warning("state_malformed", topic=msg.topic, error=str(exc))
            return
        if report.device != device:
            log.warning("state_for_other_device", topic=msg.topic, claimed=report.device)
            return
        self.states.put(device, report)  # the newest per device, many in one transaction
        await self._clear_retained(msg)

    async def _on_status(self, msg: Incoming) -> None:
        if not msg.payload:
            return
        try:
            device, _ = device_of(msg.topic)
            claimed, online = parse_status(msg.payload)
        except ProtocolError:
            return
        if claimed == device:
            self.statuses.put(device, online)  # in arrival order: a Will's offline, then online
        await self._clear_retained(msg)

    async def _clear_retained(self, msg: Incoming) -> None:
        """Clear a retained message on a device's uplink topic (from agents older than the rule)."""
        if msg.retain and msg.payload:
            try:
                await self.client.publish(Outgoing(msg.topic, b"", qos=1, retain=True))
            except MqttError as exc:
                log.info("retained_clear_failed", topic=msg.topic, error=str(exc))

    async def _on_event(self, msg: Incoming) -> None:
        try:
            device, _ = device_of(msg.topic)
            event = Event.decode(msg.payload)
        except ProtocolError:
            return
        try:
            new = await self._with_retry(self.store.record_event, device, event)
        except DatabaseUnavailable as exc:  # the device's outbox sends it again
            log.warning("event_store_failed", device=device, error=str(exc)[:200])
            return
        if new and self.on_event is not None:  # a redelivered event is not news
            self.on_event(device, event)
        if event.id:  # stored (now or before): the device may let it go
            self._acks[device].append(event.id)
            if device not in self._ack_tasks:
                self._ack_tasks[device] = asyncio.get_running_loop().create_task(self._send_acks(device))

    async def _send_acks(self, device: str) -> None:
        """One :class:`EventAck` for the events of ``device`` stored in the last moment (a backlog
        flushed by a device is acknowledged in a few messages, not one per event)."""
        try:
            await asyncio.sleep(ACK_DELAY_S)
            while self._acks[device]:
                ids = self._acks[device][:MAX_ACK_IDS]
                del self._acks[device][: len(ids)]
                try:
                    ack = Outgoing(device_topic(device, "events/ack"), EventAck(tuple(ids)).encode(), qos=1)
                    await self._answer(ack)
                except MqttError as exc:  # the device re-sends, the hub stores once and acks again
                    log.info("event_ack_failed", device=device, error=str(exc))
        finally:
            self._ack_tasks.pop(device, None)
            if not self._acks[device]:
                del self._acks[device]


__all__ = ["Collector"]
