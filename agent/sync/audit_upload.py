"""Upload of the local audit log to the hub: batches up, acknowledgements by sequence number back.

Protocol (docs/protocol.md): the device publishes :class:`~fleet.messages.AuditBatch` on
``edge/v1/devices/<id>/audit`` (QoS 1); the hub answers :class:`~fleet.messages.AuditAck` on
``edge/v1/devices/<id>/audit/ack`` naming the highest seq it holds contiguously.

Invariants:
- Records are marked uploaded only up to an ``up_to_seq`` the hub acknowledged, never on PUBACK
  (the broker having a message is not the hub having stored it).
- After a reconnect, or when no ack arrives in time, upload restarts from the uploaded mark:
  records may be sent twice, which the hub's idempotent store by (device, seq) makes harmless.
- At most ``window`` batches are in flight; each batch holds at most ``batch_size`` records.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from fleet.chain import Checkpoint, Sealed
from fleet.errors import MqttError
from fleet.log import get_logger
from fleet.messages import AuditAck, AuditBatch, Incoming, Outgoing, Status, device_topic
from fleet.mqtt import MqttClient

log = get_logger(__name__)


class AuditSource(Protocol):
    """What the uploader needs of :class:`agent.audit.AuditLog`."""

    def pending(self, limit: int) -> list[Sealed]: ...

    def mark_uploaded(self, up_to_seq: int) -> int: ...

    def checkpoints(self) -> list[Checkpoint]: ...

    def backlog(self) -> int: ...

    def anchor(self) -> tuple[int, str]: ...


class AuditUploader:
    """Sends the audit backlog whenever connected; :meth:`kick` after new records."""

    def __init__(
        self,
        client: MqttClient,
        source: AuditSource,
        device_id: str,
        key_hex: str = "",
        *,
        batch_size: int = 1000,
        window: int = 4,
        ack_timeout_s: float = 30.0,
        idle_s: float = 5.0,
    ) -> None:
        self.client = client
        self.source = source
        self.device_id = device_id
        self.key_hex = key_hex
        self.batch_size = batch_size
        self.window = max(1, window)
        self.ack_timeout_s = ack_timeout_s
        self.idle_s = idle_s
        self.acked = 0
        self.last_status: str = Status.OK.value
        self.uploaded_records = 0
        self._ack_changed = asyncio.Event()
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def topic(self) -> str:
        return device_topic(self.device_id, "audit")

    async def start(self) -> None:
        await self.client.subscribe(device_topic(self.device_id, "audit/ack"), self._on_ack, qos=1)
        self.client.on_connect(self._on_connect)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def kick(self) -> None:
        """New records were appended: upload soon."""
        self._kick.set()

    async def _on_connect(self, _session_present: bool) -> None:
        self._kick.set()

    def _on_ack(self, msg: Incoming) -> None:
        try:
            ack = AuditAck.decode(msg.payload)
        except Exception as exc:
            log.warning("audit_ack_malformed", error=str(exc))
            return
        self.last_status = ack.status
        if ack.status != Status.OK.value:
            log.warning("audit_ack_problem", status=ack.status, detail=ack.detail)
        self.acked = max(self.acked, ack.up_to_seq)
        self._ack_changed.set()

    async def _run(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.client.wait_connected(None)
                await self.flush()
                delay = 1.0
            except (MqttError, TimeoutError) as exc:
                log.info("audit_upload_paused", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.idle_s)

    async def flush(self) -> int:
        """Upload until nothing is pending; returns how many records the hub acknowledged."""
        to_thread = asyncio.to_thread
        total = 0
        while True:
            rows = await to_thread(self.source.pending, self.batch_size * self.window)
            if not rows:
                return total
            lo, hi = rows[0].seq, rows[-1].seq
            cps = [c for c in await to_thread(self.source.checkpoints) if lo <= c.seq <= hi]
            anchor = (await to_thread(self.source.anchor))[0]
            self._ack_changed.clear()
            for start in range(0, len(rows), self.batch_size):
                part = rows[start : start + self.batch_size]
                p_lo, p_hi = part[0].seq, part[-1].seq
                batch = AuditBatch(
                    self.device_id,
                    tuple((r.seq, r.body, r.hash) for r in part),
                    tuple((c.seq, c.body, c.signature) for c in cps if p_lo <= c.seq <= p_hi),
                    self.key_hex,
                    anchor,
                )
                await self.client.publish(Outgoing(self.topic, batch.encode(), qos=1))
            await self._wait_acked(hi)
            if self.last_status != Status.OK.value and self.acked < lo:
                raise MqttError(f"the hub refused the audit batch: {self.last_status}")
            marked = await to_thread(self.source.mark_uploaded, self.acked)
            total += max(0, min(self.acked, hi) - lo + 1)
            self.uploaded_records += max(0, min(self.acked, hi) - lo + 1)
            if marked < lo:
                raise MqttError(f"the hub acknowledged up to {self.acked}, below {lo}")

    async def _wait_acked(self, seq: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout_s
        while self.acked < seq:
            if self.last_status != Status.OK.value and self._ack_changed.is_set():
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no audit acknowledgement up to {seq}")
            self._ack_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ack_changed.wait(), remaining)


__all__ = ["AuditSource", "AuditUploader"]
