"""Upload of the local audit log to the hub: batches up, acknowledgements by sequence number back.

Protocol (docs/protocol.md): the device publishes :class:`~fleet.messages.AuditBatch` on
``edge/v1/devices/<id>/audit`` (QoS 1); the hub answers :class:`~fleet.messages.AuditAck` on
``edge/v1/devices/<id>/audit/ack`` naming the highest seq it holds contiguously.

Invariants:
- Records are marked uploaded only up to an ``up_to_seq`` the hub acknowledged, never on PUBACK
  (the broker having a message is not the hub having stored it).
- An acknowledgement moves the mark only when (1) its status is ``ok``, (2) it is not a retained
  message (a retained ack answers nothing this device sent; devices cannot write their ack topic,
  mosquitto/acl, but a message retained there earlier would be replayed at every subscribe), (3)
  records are in flight, and (4) its ``up_to_seq`` lies within the records in flight
  (``lo - 1 <= up_to_seq <= hi``). Anything else is ignored and counted (``acks_ignored``): a
  forged ``{"up_to_seq": 999999999, "status": "ok"}`` cannot discard a single record.
- An ack with status ``retry`` (the hub could not store a batch now: its database is unavailable)
  marks nothing either and is no refusal: when records are in flight (and it is not retained) the
  round ends and upload starts again from the uploaded mark after its ``retry_after`` (at most
  ``ack_timeout_s``), instead of after the ack timeout (counted in ``retries``).
- An ack with any other status (``chain_broken``, ``bad_request``) marks nothing: the records stay,
  the problem is reported once through ``on_problem`` (an event to the hub, kind ``audit``) and the
  upload pauses for ``problem_retry_s`` before trying again (the hub may have been repaired).
- After a reconnect, or when no ack arrives in time, upload restarts from the uploaded mark:
  records may be sent twice, which the hub's idempotent store by (device, seq) makes harmless.
- At most ``window`` batches are in flight; each batch holds at most ``batch_size`` records and
  a checkpoint signed at its last record (:meth:`AuditSource.sign_at`), without which the hub
  stores nothing of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol

from agent.sync.errors import SyncError
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

    def sign_at(self, seq: int) -> int: ...

    def backlog(self) -> int: ...

    def anchor(self) -> tuple[int, str]: ...


class AuditRefused(SyncError):
    """The hub answered a batch with a status other than ok; nothing was marked uploaded."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(f"the hub refused the audit batch: {status} {detail}".strip())
        self.status = status
        self.detail = detail


class AuditRetry(SyncError):
    """The hub asked for the batches again after ``retry_after`` seconds (status ``retry``)."""

    def __init__(self, retry_after: float, detail: str) -> None:
        super().__init__(f"the hub asks to send again in {retry_after:g}s: {detail}".strip())
        self.retry_after = retry_after


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
        problem_retry_s: float = 300.0,
        on_problem: Callable[[str, str, int, int], Awaitable[None]] | None = None,
    ) -> None:
        """``on_problem(status, detail, lo, hi)`` is called once per distinct refusal of the
        records ``lo..hi`` (the sync service sends it to the hub as an event)."""
        self.client = client
        self.source = source
        self.device_id = device_id
        self.key_hex = key_hex
        self.batch_size = batch_size
        self.window = max(1, window)
        self.ack_timeout_s = ack_timeout_s
        self.idle_s = idle_s
        self.problem_retry_s = problem_retry_s
        self.on_problem = on_problem
        self.acked = 0
        self.last_status: str = Status.OK.value
        self.uploaded_records = 0
        self.acks_ignored = 0
        self.timeouts = 0
        """Rounds that ended without an ack in ``ack_timeout_s`` (the rest is sent again)."""
        self.retries = 0
        """Rounds ended by a ``retry`` ack (sent again after its ``retry_after``)."""
        self._in_flight: tuple[int, int] | None = None
        self._problem: AuditAck | None = None
        self._retry: AuditAck | None = None
        self._reported: tuple[str, str] | None = None
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
            self.acks_ignored += 1
            return
        reason = self._ignore_reason(ack, retained=msg.retain)
        if reason is not None:
            self.acks_ignored += 1
            log.warning(
                "audit_ack_ignored",
                reason=reason,
                status=ack.status,
                up_to_seq=ack.up_to_seq,
                acked=self.acked,
            )
            return
        self.last_status = ack.status
        if ack.status == Status.RETRY.value:
            log.info("audit_ack_retry", retry_after=ack.retry_after, detail=ack.detail)
            self._retry = ack
        elif ack.status != Status.OK.value:
            log.warning("audit_ack_problem", status=ack.status, detail=ack.detail)
            self._problem = ack
        else:
            self.acked = max(self.acked, ack.up_to_seq)
        self._ack_changed.set()

    def _ignore_reason(self, ack: AuditAck, *, retained: bool) -> str | None:
        """Why ``ack`` must not be acted on, or None (the invariants in the module docstring)."""
        if retained:
            return "retained"
        if self._in_flight is None:
            return "nothing_in_flight"
        lo, hi = self._in_flight
        if ack.status != Status.OK.value:
            return None  # a refusal marks nothing; it pauses the upload and is reported
        if ack.up_to_seq > hi:
            return "beyond_sent"
        if ack.up_to_seq < lo - 1:
            return "stale"
        return None

    async def _run(self) -> None:
        delay = 1.0
        while True:
            try:
                await self.client.wait_connected(None)
                await self.flush()
                delay = 1.0
            except AuditRefused as exc:
                log.warning("audit_upload_refused", status=exc.status, detail=exc.detail)
                await asyncio.sleep(self.problem_retry_s)
                continue
            except AuditRetry as exc:
                await asyncio.sleep(min(exc.retry_after, self.ack_timeout_s))
                continue
            except (MqttError, TimeoutError) as exc:
                log.info("audit_upload_paused", error=str(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.idle_s)

    async def flush(self) -> int:
        """Upload until nothing is pending; returns how many records the hub acknowledged.

        Raises :class:`AuditRefused` when the hub answered a batch with a status other than ok or
        retry (after marking what it did acknowledge), :class:`AuditRetry` when it answered
        ``retry`` (likewise), ``TimeoutError`` when acks stop coming."""
        to_thread = asyncio.to_thread
        total = 0
        while True:
            rows = await to_thread(self.source.pending, self.batch_size * self.window)
            if not rows:
                return total
            lo, hi = rows[0].seq, rows[-1].seq
            parts = [rows[start : start + self.batch_size] for start in range(0, len(rows), self.batch_size)]
            for part in parts:  # the hub stores no batch that is not signed at its last record
                await to_thread(self.source.sign_at, part[-1].seq)
            cps = [c for c in await to_thread(self.source.checkpoints) if lo <= c.seq <= hi]
            anchor = (await to_thread(self.source.anchor))[0]
            self._ack_changed.clear()
            self._problem = None
            self._retry = None
            self.acked = max(self.acked, lo - 1)
            self._in_flight = (lo, hi)
            timed_out: TimeoutError | None = None
            try:
                for part in parts:
                    p_lo, p_hi = part[0].seq, part[-1].seq
                    batch = AuditBatch(
                        self.device_id,
                        tuple((r.seq, r.body, r.hash) for r in part),
                        tuple((c.seq, c.body, c.signature) for c in cps if p_lo <= c.seq <= p_hi),
                        self.key_hex,
                        anchor,
                    )
                    await self.client.publish(Outgoing(self.topic, batch.encode(), qos=1))
                try:
                    await self._wait_acked(hi)
                except TimeoutError as exc:  # keep what was acknowledged, then re-send the rest
                    self.timeouts += 1
                    timed_out = exc
            finally:
                self._in_flight = None
            acked = min(self.acked, hi)
            if acked >= lo:
                await to_thread(self.source.mark_uploaded, acked)
                total += acked - lo + 1
                self.uploaded_records += acked - lo + 1
            if self._problem is not None:
                problem = self._problem
                if self._reported != (problem.status, problem.detail):
                    self._reported = (problem.status, problem.detail)
                    if self.on_problem is not None:
                        await self.on_problem(problem.status, problem.detail, max(lo, acked + 1), hi)
                raise AuditRefused(problem.status, problem.detail)
            self._reported = None
            if timed_out is not None:
                raise timed_out
            if self._retry is not None and acked < hi:
                self.retries += 1
                retry = self._retry
                assert retry.retry_after is not None
                raise AuditRetry(retry.retry_after, retry.detail)
            if acked < hi:
                raise TimeoutError(f"the hub acknowledged up to {acked} of {lo}..{hi}")

    async def _wait_acked(self, seq: int) -> None:
        """Until the hub acknowledged ``seq``, refused a batch or asked for a retry; TimeoutError after
        ``ack_timeout_s`` without either."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ack_timeout_s
        while self.acked < seq and self._problem is None and self._retry is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no audit acknowledgement up to {seq}")
            self._ack_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ack_changed.wait(), remaining)


__all__ = ["AuditRefused", "AuditRetry", "AuditSource", "AuditUploader"]
