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
read with a plain subscription; devices never retain them (the broker refuses a retained publish by
a device, mosquitto/edge_acl.c), so the store keeps the inventory across hub restarts and devices
send their state after every connect. A message that still arrives retained on a device topic (left
by an agent older than this rule) is recorded and then cleared.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable

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
from hub.sync.store import HubStore

log = get_logger(__name__)

ACK_DELAY_S = 0.05
"""Event ids stored within this long are acknowledged in one message."""


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
        self._state_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._acks: defaultdict[str, list[str]] = defaultdict(list)
        self._ack_tasks: dict[str, asyncio.Task[None]] = {}
        self.batches = 0

    async def start(self) -> None:
        await self.client.subscribe(shared(f"{PREFIX}/devices/+/audit"), self._on_audit, qos=1)
        await self.client.subscribe(shared(f"{PREFIX}/devices/+/events"), self._on_event, qos=1)
        await self.client.subscribe(f"{PREFIX}/devices/+/state", self._on_state, qos=1)
        await self.client.subscribe(f"{PREFIX}/devices/+/status", self._on_status, qos=1)

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
                ack = await self._store(device, batch)
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
                await self.client.publish(Outgoing(device_topic(device, "audit/ack"), ack.encode(), qos=1))
            except MqttError as exc:
                log.info("audit_ack_failed", device=device, error=str(exc))

    async def _store(self, device: str, batch: AuditBatch) -> AuditAck:
        return await asyncio.to_thread(self.store.store_audit, device, batch)

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
        # One device's reports are stored in arrival order (a burst would otherwise race in the
        # thread pool and leave an older report as the device's state).
        async with self._state_locks[device]:
            await asyncio.to_thread(self.store.record_state, device, report)
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
            await asyncio.to_thread(self.store.record_status, device, online)
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
        new = await asyncio.to_thread(self.store.record_event, device, event)
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
                    await self.client.publish(ack)
                except MqttError as exc:  # the device re-sends, the hub stores once and acks again
                    log.info("event_ack_failed", device=device, error=str(exc))
        finally:
            self._ack_tasks.pop(device, None)
            if not self._acks[device]:
                del self._acks[device]


__all__ = ["Collector"]
