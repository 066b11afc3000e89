"""One simulated box: the device side of the protocol (docs/protocol.md) without a model.

What it does on one MQTT connection of its own (its own TLS client certificate, device listener):

- connects with the offline Last Will, then says it is online and sends its state (with hardware,
  ``health`` per (model, version) from a real :class:`agent.health.HealthBook`, ``serving``,
  ``failing``) after every connect and whenever it changes;
- events go to an outbox and leave it only on the hub's ``events/ack`` (sent again after a
  reconnect or ``event_ack_timeout_s``);
- audit records are sealed with :mod:`fleet.chain` and signed checkpoints (its own Ed25519 key,
  registered at the hub like ``edge-hub device register``), uploaded in batches of at most 1,000 and
  marked uploaded only up to the hub's ``up_to_seq``;
- keeps the retained metadata, verifies it (:class:`~tests.fleetsim.verify.MetaVerifier`, shared
  by the fleet), fetches its group's deployment document with a chunk request and checks it
  against the signed sha256, resolves the signed wave selector for its own id
  (:meth:`registry.metadata.Deployment.for_device`) and "installs" each model version: no bytes
  are moved and nothing is loaded; the outcome is the box's :class:`Behaviour` for that version
  (healthy, smoke test failure, slower), reported as a real box reports it (event, health entry,
  ``failing``).

Invariants: everything runs on the one asyncio loop (paho's network thread only hands messages
over); a box never trusts a deployment whose bytes do not hash to the verified target.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.health import HealthBook
from agent.sync.state import build_report
from fleet.chain import GENESIS, Entry, Sealed, make_checkpoint, seal_all
from fleet.device_key import DeviceKey
from fleet.errors import MqttError, ProtocolError
from fleet.messages import (
    BLOB_REQUESTS,
    HUB_PRESENCE,
    META_INDEX,
    META_PREFIX,
    AuditAck,
    AuditBatch,
    ChunkRequest,
    Event,
    EventAck,
    HubPresence,
    Incoming,
    MetaIndex,
    Outgoing,
    device_topic,
    offline_will,
    online_status,
)
from fleet.mqtt import MqttConfig
from registry.metadata import Deployment, deployment_target_path
from tests.fleetsim.loopclient import LoopClient
from tests.fleetsim.verify import MetaRefused, MetaVerifier

HEALTHY = "healthy"
SMOKE_FAILS = "smoke_test_failed"
SLOWER = "slower"
OUTCOMES = (HEALTHY, SMOKE_FAILS, SLOWER)
BATCH = 1000


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the box's model versions behave once installed (a version not named is healthy)."""

    versions: Mapping[str, str] = field(default_factory=dict)
    """version -> ``healthy``, ``smoke_test_failed`` or ``slower``"""
    tokens_per_s: float = 20.0
    slowdown: float = 0.4
    """fraction of tokens/s a ``slower`` version loses"""
    requests: int = 25
    """requests served (and reported in ``health``) after each activation"""

    def __post_init__(self) -> None:
        bad = {v: o for v, o in self.versions.items() if o not in OUTCOMES}
        if bad:
            raise ValueError(f"unknown behaviour {bad}: expected one of {', '.join(OUTCOMES)}")


@dataclass
class Stats:
    """What the box saw, with wall-clock times (time.time()) for the benchmarks."""

    connected_at: float | None = None
    connects: int = 0
    states_sent: int = 0
    events_sent: int = 0
    events_acked: int = 0
    audit_acked: int = 0
    audit_resends: int = 0
    """batches sent again after ``audit_ack_timeout_s`` without an ack (as agent/sync/audit_upload.py)"""
    audit_retries: int = 0
    """batches sent again after the hub answered ``retry`` (its ``retry_after`` later)"""
    audit_done_at: float | None = None
    """when the hub acknowledged the last record held (time.monotonic())"""
    chunk_requests: int = 0
    deployments: dict[str, float] = field(default_factory=dict)
    """sha256 of each deployment document -> when its bytes were fetched and checked against the
    verified metadata (before anything is installed)"""
    activations: list[tuple[str, str, str, float]] = field(default_factory=list)
    """(model, version, outcome, at)"""
    refusals: list[str] = field(default_factory=list)


class SimBox:
    def __init__(
        self,
        device_id: str,
        config: MqttConfig,
        verifier: MetaVerifier,
        *,
        groups: tuple[str, ...] = ("edge",),
        hardware: Mapping[str, Any] | None = None,
        behaviour: Behaviour | None = None,
        key: DeviceKey | None = None,
        event_ack_timeout_s: float = 30.0,
        chunk_timeout_s: float = 10.0,
        audit_ack_timeout_s: float = 30.0,
        client_factory: Callable[[MqttConfig], Any] | None = None,
    ) -> None:
        self.id = device_id
        self.config = dataclasses.replace(config, will=offline_will(device_id))
        self.verifier = verifier
        self.groups = groups
        self.hardware = dict(hardware or {})
        self.behaviour = behaviour or Behaviour()
        self.key = key or DeviceKey.generate()
        self.event_ack_timeout_s = event_ack_timeout_s
        self.chunk_timeout_s = chunk_timeout_s
        self.audit_ack_timeout_s = audit_ack_timeout_s
        self.client_factory = client_factory or LoopClient
        self.client: Any = None
        """a :class:`~tests.fleetsim.loopclient.LoopClient` (default) or the device's own
        :class:`fleet.mqtt.MqttClient` (one network thread per box)"""
        self.stats = Stats()
        self.health = HealthBook()
        self.serving: dict[str, str] = {}
        self.installed: set[str] = set()
        self.failing: dict[str, dict[str, Any]] = {}
        self.pinned: str | None = None
        self.files: dict[str, bytes] = {}
        self.index: list[str] = []
        self.outbox: dict[str, tuple[Event, float]] = {}
        self._outbox_empty = asyncio.Event()
        self._outbox_empty.set()
        self.records: list[Sealed] = []
        self.checkpoints: list[tuple[int, str, str]] = []
        self.uploaded = 0
        self._audit_ack: asyncio.Event = asyncio.Event()
        self._audit_retry: AuditAck | None = None
        self._chunks: dict[bytes, asyncio.Future[bytes]] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._last_state: bytes | None = None
        self._audit_lock = asyncio.Lock()
        self.hub_online = False
        self._deployment: tuple[str, Deployment] | None = None

    @property
    def key_hex(self) -> str:
        return self.key.public.raw.hex()

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        client = self.client = self.client_factory(self.config)
        await client.start()
        # Registered before the first connection completes: renewed by the client on each connect.
        await client.subscribe(META_PREFIX + "#", self._on_meta, qos=1)
        await client.subscribe(device_topic(self.id, "events/ack"), self._on_event_ack, qos=1)
        await client.subscribe(device_topic(self.id, "audit/ack"), self._on_audit_ack, qos=1)
        await client.subscribe(device_topic(self.id, "blobs"), self._on_blob, qos=1)
        client.on_connect(self._on_connect)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._refresh_loop()))
        self._tasks.append(loop.create_task(self._resend_loop()))

    async def wait_connected(self, timeout: float) -> None:
        assert self.client is not None
        await self.client.wait_connected(timeout)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.client is not None:
            await self.client.close()

    async def _on_connect(self, _session_present: bool) -> None:
        assert self.client is not None
        self.stats.connects += 1
        if self.stats.connected_at is None:
            self.stats.connected_at = time.time()
        try:
            await self.client.publish(online_status(self.id, time.time()))
        except MqttError:
            return
        self._last_state = None
        await self.publish_state()
        for event, _ in list(self.outbox.values()):
            await self._send_event(event)
        if self.uploaded < len(self.records):
            asyncio.get_running_loop().create_task(self.upload_audit())

    # --- state --------------------------------------------------------------------------------

    def report(self, at: float | None = None) -> Any:
        return build_report(
            self.id,
            agent_version="fleetsim",
            groups=self.groups,
            hardware=self.hardware,
            default_model=self.pinned,
            loaded_models=self.serving,
            installed=self.installed,
            policy_version=None,
            audit_backlog=len(self.records) - self.uploaded,
            last_sync=at,
            at=time.time() if at is None else at,
            failing=self.failing.values(),
            events_pending=len(self.outbox),
            health=self.health.report(),
            serving=self.serving,
        )

    async def publish_state(self, *, force: bool = False, at: float | None = None) -> bool:
        """Send the state when it changed (``at`` aside) or ``force``; False when not connected."""
        assert self.client is not None
        report = self.report(at)
        key = dataclasses.replace(report, at=0.0).encode()
        if not force and key == self._last_state:
            return True
        try:
            await self.client.publish(Outgoing(device_topic(self.id, "state"), report.encode(), qos=1))
        except MqttError:
            return False
        self._last_state = key
        self.stats.states_sent += 1
        return True

    # --- events -------------------------------------------------------------------------------

    async def report_event(self, kind: str, status: str, target: str = "", detail: str = "") -> None:
        event = Event(kind, status, target, detail, time.time(), os.urandom(16).hex())
        self.outbox[event.id] = (event, time.monotonic())
        self._outbox_empty.clear()
        await self._send_event(event)

    async def _send_event(self, event: Event) -> None:
        assert self.client is not None
        self.outbox[event.id] = (event, time.monotonic())
        try:
            await self.client.publish(Outgoing(device_topic(self.id, "events"), event.encode(), qos=1))
            self.stats.events_sent += 1
        except MqttError:
            pass  # sent again after the reconnect

    def _on_event_ack(self, msg: Incoming) -> None:
        if msg.retain:
            return
        try:
            ack = EventAck.decode(msg.payload)
        except ProtocolError:
            return
        for i in ack.ids:
            if self.outbox.pop(i, None) is not None:
                self.stats.events_acked += 1
        if not self.outbox:
            self._outbox_empty.set()

    async def wait_events_acked(self, timeout: float) -> None:
        await asyncio.wait_for(self._outbox_empty.wait(), timeout)

    async def _resend_loop(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.event_ack_timeout_s))
            if self.client is None or not self.client.is_connected:
                continue
            now = time.monotonic()
            for event, sent in list(self.outbox.values()):
                if now - sent > self.event_ack_timeout_s:
                    await self._send_event(event)

    # --- audit --------------------------------------------------------------------------------

    def add_audit(self, n: int) -> None:
        """Seal ``n`` records after the head and sign a checkpoint over the new head."""
        head_seq = len(self.records)
        head_hash = self.records[-1].hash if self.records else GENESIS
        entries = (
            Entry("inference.chat", "models/m", "allowed", "", {"user": "sim"}, {"i": head_seq + i})
            for i in range(n)
        )
        self.records.extend(seal_all(entries, head_seq, head_hash, time.time()))
        # As the device log: a checkpoint every BATCH records and one over the head, so each
        # batch (which ends at a multiple of BATCH or at the head) is signed at its last record.
        for seq in [*range((head_seq // BATCH + 1) * BATCH, len(self.records), BATCH), len(self.records)]:
            rec = self.records[seq - 1]
            cp = make_checkpoint(rec.seq, rec.hash, self.key.key_id, time.time(), self.key.sign)
            self.checkpoints.append((cp.seq, cp.body, cp.signature))

    def batch_at(self, start: int) -> AuditBatch:
        """The batch the device sends from record index ``start``: up to the next multiple of
        BATCH or the head, with the checkpoints that fall in it (one signs its last record)."""
        end = min(len(self.records), (start // BATCH + 1) * BATCH)
        rows = self.records[start:end]
        lo, hi = rows[0].seq, rows[-1].seq
        return AuditBatch(
            self.id,
            tuple((r.seq, r.body, r.hash) for r in rows),
            tuple(c for c in self.checkpoints if lo <= c[0] <= hi),
            self.key_hex,
            0,
        )

    def audit_batches(self) -> list[Outgoing]:
        """Every batch from the uploaded mark to the head, as the QoS 1 publishes the device makes
        (for benchmarks that queue a whole backlog at the broker at once)."""
        out = []
        start = self.uploaded
        while start < len(self.records):
            batch = self.batch_at(start)
            out.append(Outgoing(device_topic(self.id, "audit"), batch.encode(), qos=1))
            start = batch.last_seq
        return out

    async def upload_audit(self, timeout: float = 60.0) -> None:
        """Send batches from the uploaded mark until the hub acknowledged every record."""
        assert self.client is not None
        async with self._audit_lock:
            deadline = time.monotonic() + timeout
            while self.uploaded < len(self.records):
                batch = self.batch_at(self.uploaded)
                self._audit_ack.clear()
                self._audit_retry = None
                try:
                    await self.client.publish(Outgoing(device_topic(self.id, "audit"), batch.encode(), qos=1))
                    wait = min(self.audit_ack_timeout_s, deadline - time.monotonic())
                    await asyncio.wait_for(self._audit_ack.wait(), max(0.1, wait))
                    retry = self._audit_retry
                    if retry is not None and self.uploaded < batch.last_seq:  # again from the mark
                        self.stats.audit_retries += 1
                        assert retry.retry_after is not None
                        await asyncio.sleep(min(retry.retry_after, self.audit_ack_timeout_s))
                except (MqttError, TimeoutError):  # sent again from the mark, as the device does
                    self.stats.audit_resends += 1
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{self.id}: audit not acknowledged past seq {self.uploaded} "
                            f"({'; '.join(self.stats.refusals[-3:]) or 'no refusal'})"
                        ) from None
                    await asyncio.sleep(0.5)

    def _on_audit_ack(self, msg: Incoming) -> None:
        if msg.retain:
            return
        try:
            ack = AuditAck.decode(msg.payload)
        except ProtocolError:
            return
        if ack.status == "retry":  # not a refusal: the hub's database is unavailable for now
            self._audit_retry = ack
            self._audit_ack.set()
            return
        if ack.status != "ok":
            self.stats.refusals.append(f"audit {ack.status}: {ack.detail}")
            return
        if self.uploaded <= ack.up_to_seq <= len(self.records):
            self.stats.audit_acked += ack.up_to_seq - self.uploaded
            self.uploaded = ack.up_to_seq
            if self.uploaded == len(self.records):
                self.stats.audit_done_at = time.monotonic()
            self._audit_ack.set()

    # --- metadata, deployments, chunk requests -------------------------------------------------

    def _on_meta(self, msg: Incoming) -> None:
        name = msg.topic.removeprefix(META_PREFIX)
        if name == HUB_PRESENCE:
            with contextlib.suppress(ProtocolError):
                self.hub_online = HubPresence.decode(msg.payload).online if msg.payload else False
            return
        if name == META_INDEX:
            with contextlib.suppress(ProtocolError):
                self.index = list(MetaIndex.decode(msg.payload).files) if msg.payload else []
            return
        if msg.payload:
            changed = self.files.get(name) != msg.payload
            self.files[name] = msg.payload
            if changed and name == "timestamp.json":
                self._wake.set()
        else:
            self.files.pop(name, None)

    async def _refresh_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            deadline = time.monotonic() + 10.0
            while True:
                try:
                    await self.refresh()
                    break
                except MetaRefused as exc:
                    if not str(exc).startswith("not received yet") or time.monotonic() > deadline:
                        self.stats.refusals.append(str(exc))
                        await self.report_event("registry", "metadata_refused", "", str(exc)[:500])
                        break
                    await asyncio.sleep(0.1)
                except (MqttError, TimeoutError, ValueError) as exc:
                    self.stats.refusals.append(f"refresh: {exc}")
                    await asyncio.sleep(1.0)
                    self._wake.set()
                    break

    async def refresh(self) -> None:
        """One sync round: verify, take the group's deployment, install what it names for us."""
        targets = self.verifier.targets(self.files, self.index).signed.targets
        for group in self.groups:
            path = deployment_target_path(group)
            target = targets.get(path)
            if target is None:
                continue
            sha = target.hashes["sha256"]
            if self._deployment is None or self._deployment[0] != sha:
                self._deployment = (sha, Deployment.from_json(await self.fetch(sha, target.length)))
                self.stats.deployments.setdefault(sha, time.time())  # verified, fetched, parsed
            deployment = self._deployment[1].for_device(self.id)
            self.pinned = next((m.model for m in deployment.models if m.pin), None)
            for entry in deployment.models:
                version = entry.version or newest(targets, entry.model)
                if version is not None and self.serving.get(entry.model) != version:
                    await self.activate(targets, entry.model, version)
        await self.publish_state()

    async def fetch(self, sha256: str, length: int) -> bytes:
        """A document (one chunk) by chunk request; its bytes must hash to ``sha256``."""
        import hashlib

        assert self.client is not None
        request = ChunkRequest(sha256, 0, 0, length)
        for _attempt in range(8):
            fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self._chunks[request.correlation] = fut
            self.stats.chunk_requests += 1
            try:
                await self.client.wait_connected(self.chunk_timeout_s)  # retained meta comes first
                await self.client.publish(
                    Outgoing(
                        BLOB_REQUESTS,
                        request.encode(),
                        qos=1,
                        response_topic=device_topic(self.id, "blobs"),
                        correlation=request.correlation,
                    )
                )
                data = await asyncio.wait_for(fut, self.chunk_timeout_s)
            except (MqttError, TimeoutError) as exc:
                self.stats.refusals.append(f"chunk {sha256[:12]}: {type(exc).__name__} {exc}")
                continue
            except LookupError as exc:  # not_found: the hub has not indexed it yet
                self.stats.refusals.append(f"chunk {sha256[:12]}: {exc}")
                await asyncio.sleep(1.0)
                continue
            finally:
                self._chunks.pop(request.correlation, None)
            if hashlib.sha256(data).hexdigest() == sha256:
                return data
            self.stats.refusals.append("chunk_hash_mismatch")
        raise TimeoutError(f"{self.id}: no valid reply for {sha256[:12]} after 8 requests")

    def _on_blob(self, msg: Incoming) -> None:
        fut = self._chunks.get(msg.correlation or b"")
        if fut is None or fut.done():
            return  # a reply we did not ask for
        status = msg.prop("status")
        if status == "ok":
            fut.set_result(msg.payload)
        else:
            fut.set_exception(LookupError(f"{status}: {msg.payload[:200]!r}"))

    async def activate(self, targets: Mapping[str, Any], model: str, version: str) -> None:
        """Install (model, version) as its behaviour says, and report it as a real box does."""
        outcome = self.behaviour.versions.get(version, HEALTHY)
        target = f"models/{model}/{version}"
        self.installed.update(p for p in targets if p.startswith(target + "/"))
        now = time.time()
        self.stats.activations.append((model, version, outcome, now))
        if outcome == SMOKE_FAILS:
            self.health.activation(model, version, SMOKE_FAILS)
            self.failing[model] = {
                "model": model,
                "version": version,
                "attempts": 1,
                "next_retry": now + 300,
                "error": "smoke test failed: no tokens came out",
            }
            await self.report_event("deployment", SMOKE_FAILS, target, "attempt 1")
            return
        self.serving[model] = version
        self.failing.pop(model, None)
        self.health.activation(model, version, "passed")
        tps = self.behaviour.tokens_per_s * (1 - self.behaviour.slowdown if outcome == SLOWER else 1)
        for _ in range(self.behaviour.requests):
            self.health.observe(
                model, ok=True, ttft_s=0.1, completion_tokens=21, duration_s=0.1 + 20 / tps, version=version
            )
        await self.report_event("deployment", "activated", target, "serving (attempt 1)")


def newest(targets: Mapping[str, Any], model: str) -> str | None:
    from registry.device import _version_key

    versions = {p.split("/")[2] for p in targets if p.startswith(f"models/{model}/")}
    return max(versions, key=_version_key) if versions else None


__all__ = ["HEALTHY", "OUTCOMES", "SLOWER", "SMOKE_FAILS", "Behaviour", "SimBox", "Stats", "newest"]
