"""The device's sync loop: refresh signed metadata over MQTT, install, reconcile, report.

Lifecycle: :meth:`SyncService.start` returns at once (the agent serves locally whether or not the
hub is reachable); a background task waits for a connection, then for every new ``timestamp.json``
(or every ``refresh_interval_s``) runs :meth:`SyncService.sync_once`:

1. ``DeviceRegistry.update`` with the :class:`~agent.sync.fetcher.MqttFetcher` (python-tuf checks the
   metadata; missing models are fetched chunk by chunk, verified, installed atomically). A refusal
   is recorded in the audit log and reported as an event with status ``metadata_refused``.
2. Policies: the policy this device's deployments name (the registry installs no other) is
   offered to :func:`agent.policy.accept_policy` (which refuses older versions and records the
   outcome in the audit log); groups naming different policies apply none.
3. Reconcile (:mod:`agent.sync.reconcile`) and apply: activation = load + smoke test + switch
   through the pool's ``swap``, which keeps the previous model serving when the new one fails.
   Every outcome is an event with a status code; a failed version is retried with exponential
   backoff (:mod:`agent.sync.retry`, schedule kept in the sync ledger across restarts).
4. Remove what the deployments no longer name (:mod:`agent.sync.removal`): unload it from the
   pool at once (only models from the store, never the default or the last one), delete unneeded
   versions from the store after ``removal_grace_s`` (the previous version stays as the rollback
   target with ``keep_previous``).
5. Publish the reported state (never retained) and upload the audit log.

Events go through the persistent outbox (:mod:`agent.sync.outbox`); retry schedules and removal
clocks live in the same sync ledger (:mod:`agent.sync.ledger`).

Invariant: nothing in this loop can stop the daemon: every failure is logged, reported and retried
at the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from agent.engine.base import ModelInfo
from agent.errors import EngineError
from agent.health import HealthBook
from agent.sync.audit_upload import AuditSource, AuditUploader
from agent.sync.errors import SYNC_FAILURES, SyncError, TransferError
from agent.sync.fetcher import MqttFetcher, RetainedMetadata, attach, trusted_plans
from agent.sync.gate import TransferGate
from agent.sync.ledger import Failure, FailureBook, Ledger, UnneededBook
from agent.sync.outbox import DEFAULT_CAPACITY, Outbox
from agent.sync.reconcile import Activate, Defer, Missing, desired_models, plan
from agent.sync.removal import PoolModel, due_for_removal, kept_versions, to_unload, unneeded_since
from agent.sync.retry import (
    RetryPolicy,
    after_failure,
    deployments_basis,
    held_back,
    stale,
)
from agent.sync.state import StatePublisher, build_report
from agent.sync.wake import actionable_times, sleep_s
from fleet.errors import FleetError, MqttError, ProtocolError
from fleet.log import get_logger
from fleet.messages import (
    Event,
    EventAck,
    Incoming,
    Outgoing,
    Status,
    device_topic,
    offline_will,
    online_status,
)
from fleet.mqtt import MqttClient, MqttConfig
from registry.device import DeviceRegistry
from registry.exceptions import RegistryError

log = get_logger(__name__)


class ServingPool(Protocol):
    """What the sync loop needs of :class:`agent.engine.pool.ModelPool`."""

    @property
    def default_id(self) -> str | None: ...

    def models(self) -> list[ModelInfo]: ...

    def status(self) -> list[Any]: ...

    async def swap(self, info: ModelInfo, *, pin: bool = False) -> Any: ...


class AuditRecorder(Protocol):
    def submit(self, entry: Any) -> Any: ...


@dataclass
class SyncOptions:
    device_id: str
    mqtt: MqttConfig
    refresh_interval_s: float = 900.0
    chunk_window: int = 8
    chunk_timeout_s: float = 30.0
    audit_batch: int = 1000
    state_interval_s: float = 60.0
    agent_version: str = ""
    hardware: Mapping[str, Any] = field(default_factory=dict)
    audit_key_hex: str = ""
    outbox_capacity: int = DEFAULT_CAPACITY
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    keep_previous: bool = True
    removal_grace_s: float = 3600.0
    event_ack_timeout_s: float = 30.0
    """An event sent and not acknowledged by the hub within this long is sent again."""
    mirrors: tuple[str, ...] = ()
    """``[hub] mirrors``: asked before the signed deployments' mirrors, then MQTT."""
    mirror_ca_file: Path | None = None
    mirror_timeout_s: float = 10.0
    max_download_bytes_per_s: int | None = None
    download_window: str | None = None


EVENTS_IN_FLIGHT = 500
"""Events sent and awaiting the hub's acknowledgement at most (the outbox flush stops there)."""


def _entry(action: str, resource: str | None, outcome: str, reason: str, details: dict[str, Any]) -> Any:
    from agent.audit.store import agent_actor
    from fleet.chain import Entry

    return Entry(action, resource, outcome, reason, agent_actor(), details)


class SyncService:
    """Fleet sync of one device. Construct in ``agent.daemon.app``; ``start()``; ``close()`` on shutdown."""

    def __init__(
        self,
        options: SyncOptions,
        state_dir: Path,
        pool: ServingPool,
        *,
        audit: AuditSource | None = None,
        policy_sink: Callable[[bytes, int], None] | None = None,
        policy_version: Callable[[], str | None] = lambda: None,
        client_factory: Callable[[MqttConfig], MqttClient] = MqttClient,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        registry: DeviceRegistry | None = None,
        ledger: Ledger | None = None,
        health: HealthBook | None = None,
    ) -> None:
        """``registry`` and ``ledger`` default to new ones on ``state_dir``; the daemon passes its own
        (one :class:`DeviceRegistry` per daemon, :mod:`agent.daemon.app`), whose refusals it routes to
        :meth:`refused`."""
        self.options = options
        self.state_dir = state_dir
        self.pool = pool
        self.audit = audit
        self.policy_sink = policy_sink
        self.policy_version = policy_version
        self.now = now
        config = options.mqtt
        if config.will is None:
            from dataclasses import replace

            config = replace(config, will=offline_will(options.device_id))
        self.client = client_factory(config)
        self.registry = (
            registry if registry is not None else DeviceRegistry(state_dir, on_refusal=self.refused)
        )
        self.metadata = RetainedMetadata(self.client)
        self.metadata.on_timestamp = self._wake_up
        self.uploader: AuditUploader | None = None
        self.state = StatePublisher(self.client, options.device_id)
        self._standing: dict[str, str] = {}
        self.serving_versions: dict[str, str] = {}
        self.health = health if health is not None else HealthBook()
        self.health.version_of = self.serving_versions.get
        """Per-model health the daemon feeds (requests, errors, TTFT, tokens/s) and activation
        smoke tests; reported in the state for staged rollouts."""
        self.last_sync: float | None = None
        self.events_sent: list[Event] = []
        self.ledger = ledger if ledger is not None else Ledger.open(state_dir)
        self.outbox = Outbox(self.ledger, options.outbox_capacity)
        self._flush_lock = asyncio.Lock()
        self._flush_wanted = False
        self._flusher: asyncio.Task[None] | None = None
        self._awaiting: dict[str, float] = {}  # event id -> when sent (monotonic), awaiting the hub
        self._acked_ids: list[str] = []  # acknowledged by the hub, to delete from the outbox
        self._deleting: set[str] = set()  # acknowledged, deletion not committed yet: not re-sent
        self._ack_writer: asyncio.Task[None] | None = None
        self.failures = FailureBook(self.ledger)
        self.unneeded = UnneededBook(self.ledger)
        self._basis = ""
        self._deferred: set[str] = set()  # models deferred by their window in the last round
        self._in_use: set[tuple[str, str]] = set()  # (model, version) the pool served last round
        self.random: Callable[[], float] = random.random
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._state_task: asyncio.Task[None] | None = None
        self.rounds = 0
        self.fetcher: MqttFetcher | None = None
        self.gate = TransferGate(options.max_download_bytes_per_s, options.download_window, now=now)
        self._window_wait = False  # the last round stopped a transfer at the closed download window

    # --- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        o = self.options
        self.fetcher = MqttFetcher(
            loop,
            self.client,
            o.device_id,
            self.metadata,
            trusted_plans(self.registry.metadata_dir),
            self.state_dir / "sync" / "partial",
            window=o.chunk_window,
            chunk_timeout_s=o.chunk_timeout_s,
            on_refusal=self.refused,
            mirrors=self.mirror_urls,
            gate=self.gate,
            mirror_timeout_s=o.mirror_timeout_s,
            mirror_ca_file=o.mirror_ca_file,
        )
        attach(self.registry, self.fetcher)  # transfers are renamed into the store, not copied
        self.metadata.on_hub_back = self._hub_back
        self.client.on_connect(self._on_connect)
        # Subscriptions before the connection: a resumed session's kept messages (acks) arrive
        # right after CONNACK and would otherwise match no handler (fleet.mqtt.MqttClient.start).
        await self.client.subscribe(device_topic(o.device_id, "events/ack"), self._on_events_ack, qos=1)
        await self.metadata.start()
        if self.audit is not None:
            self.uploader = AuditUploader(
                self.client,
                self.audit,
                o.device_id,
                o.audit_key_hex,
                batch_size=o.audit_batch,
                on_problem=self._audit_refused,
            )
            await self.uploader.start()
        await self.client.start()
        self._task = loop.create_task(self._run())
        self._state_task = loop.create_task(self._state_loop())

    async def close(self) -> None:
        for task in (self._task, self._state_task, self._flusher, self._ack_writer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.uploader is not None:
            await self.uploader.close()
        if self.client.is_connected:
            with contextlib.suppress(MqttError):
                await self.client.publish(offline_will(self.options.device_id), timeout=2)
        await self.client.close()
        self.ledger.close()

    async def _audit_refused(self, status: str, detail: str, lo: int, hi: int) -> None:
        """The hub refused audit records ``lo..hi`` (``chain_broken``, ``bad_request``): they stay
        in the log, unmarked; the operator hears of it as an event (kind ``audit``)."""
        await self.report(Event("audit", status, f"audit/{lo}-{hi}", detail[:1900], time.time()))

    def mirror_urls(self) -> list[str]:
        """``[hub] mirrors``, then those the signed deployments of this box's groups name."""
        urls = list(self.options.mirrors)
        with contextlib.suppress(RegistryError, OSError):
            deployments = self.registry.updating_deployments
            for deployment in deployments if deployments is not None else self.registry.deployments():
                urls.extend(deployment.mirrors)
        return urls

    def _wake_up(self) -> None:
        self._wake.set()

    def _hub_back(self) -> None:
        """The hub announced itself: transfers ask again at once what they asked while it was away."""
        if self.fetcher is not None:
            self.fetcher.hub_back()

    async def _on_connect(self, _session_present: bool) -> None:
        self.state.forget()
        self._awaiting.clear()  # what was sent before may have been lost with the connection
        with contextlib.suppress(MqttError):
            await self.client.publish(online_status(self.options.device_id, time.time()))
        await self._flush_events()
        self._wake.set()

    # --- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self.client.wait_connected(None)
            self._wake.clear()
            try:
                await self.sync_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must survive anything and retry
                log.error("sync_round_failed", error=repr(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._sleep_s())

    def _sleep_s(self) -> float:
        """Until the next refresh, or the next retry or removal a round can act on
        (:mod:`agent.sync.wake`); a time already past wakes no sooner than the retry backoff base
        (capped by the refresh interval), so the loop never spins on it."""
        o = self.options
        try:
            times = actionable_times(
                self.failures.all().values(),
                self._basis,
                self._deferred,
                self.unneeded.all(),
                o.removal_grace_s,
                self._in_use,
            )
        except SYNC_FAILURES:
            times = []
        floor = min(o.refresh_interval_s, o.retry.initial_s)
        if self._window_wait:  # the next round when the download window opens
            times = [*times, self.now().timestamp() + max(self.gate.opens_in_s(), 1.0)]
        return sleep_s(self.now().timestamp(), o.refresh_interval_s, floor, times)

    async def _state_loop(self) -> None:
        while True:
            if self.client.is_connected:
                await self.publish_state()
                if self._awaiting:  # events whose ack is overdue are sent again
                    self._kick_flush()
            await asyncio.sleep(self.options.state_interval_s)

    async def sync_once(self) -> None:
        """One round: refresh + install, policies, reconcile + activate, report."""
        assert self.fetcher is not None
        self.rounds += 1
        self._window_wait = False
        try:
            await asyncio.to_thread(self.registry.update, self.fetcher, only_deployed=True)
        except (RegistryError, SyncError, FleetError) as exc:
            if isinstance(exc, TransferError) and exc.status == Status.DOWNLOAD_WINDOW.value:
                # Not a failure: the bytes wait for the window; what is installed is reconciled now.
                self._window_wait = True
                log.info("sync_transfer_waiting", reason="window", detail=str(exc))
                await self._report_once(Event("transfer", exc.status, "download_window", str(exc)[:1900]))
                await self.reconcile()
                await self.publish_state()
                return
            status = Status.METADATA_REFUSED if isinstance(exc, RegistryError) else Status.ERROR
            await self.report(Event("registry", status.value, "", str(exc)[:1900], time.time()))
            await self.publish_state()
            return
        self.last_sync = time.time()
        await self._apply_policies()
        await self.reconcile()
        await self.publish_state()

    async def _apply_policies(self) -> None:
        """Offer the policy this device's deployments name to the sink. The registry installs only
        policies named by the device's own deployments; when its groups name different ones, none
        is applied (the policy in force stays) and each is reported refused."""
        if self.policy_sink is None:
            return
        targets = self.registry.index().of_kind("policy")
        if len(targets) > 1:
            names = ", ".join(sorted(t.ref.name for t in targets))
            detail = f"this device's groups name different policies ({names}); the policy in force stays"
            for target in targets:
                await self._report_once(Event("policy", Status.POLICY_REFUSED.value, target.path, detail))
            return
        for target in targets:
            try:
                raw = await asyncio.to_thread(self.registry.policy_bytes, target.ref.name)
            except RegistryError as exc:
                await self.report(Event("policy", Status.POLICY_REFUSED.value, target.path, str(exc)))
                continue
            if raw is None:
                continue
            version = _document_version(raw) or target.targets_version
            before = self.policy_version()
            try:
                await asyncio.to_thread(self.policy_sink, raw, version)
            except Exception as exc:
                if "not newer" not in str(exc):
                    await self.report(
                        Event("policy", Status.POLICY_REFUSED.value, target.path, str(exc)[:1900])
                    )
                continue
            if self.policy_version() != before:
                await self.report(
                    Event("policy", Status.POLICY_APPLIED.value, target.path, f"version {version}")
                )

    def _installed(self) -> dict[tuple[str, str], ModelInfo]:
        out: dict[tuple[str, str], ModelInfo] = {}
        for m in self.registry.models():
            man = m.manifest
            out[(man.id, man.version)] = ModelInfo(
                id=man.id,
                path=self.registry.store.path(m.target.sha256),
                format=man.format,
                task=man.task,
                n_ctx_train=man.context_length,
                size_bytes=man.file_size,
                chat_template=man.chat_template,
            )
        return out

    def _serving(self, installed: Mapping[tuple[str, str], ModelInfo]) -> dict[str, str]:
        """model -> the installed version the pool serves, found by the served file. Versions
        that share one file (the same weights published again) are told apart by the version this
        service activated last (``serving_versions``); without one, the last such version."""
        by_path: dict[str, list[str]] = {}
        for (model, version), info in installed.items():
            by_path.setdefault(f"{model}\0{info.path}", []).append(version)
        serving: dict[str, str] = {}
        for info in self.pool.models():
            versions = by_path.get(f"{info.id}\0{info.path}")
            if versions:
                active = self.serving_versions.get(info.id)
                serving[info.id] = active if active in versions else versions[-1]
        return serving

    async def reconcile(self) -> None:
        installed = self._installed()
        serving = self._serving(installed)
        deployments = self.registry.deployments()
        now = self.now()
        self._basis = basis = deployments_basis(deployments)
        try:
            failures = self.failures.all()
        except SYNC_FAILURES as exc:  # a broken ledger: no retry schedule this round, activate anyway
            log.error("sync_ledger_unreadable", what="failures", error=str(exc))
            failures = {}
        for model in stale(failures, (w[0] for w in desired_models(deployments)), basis):
            del failures[model]
            try:
                self.failures.clear(model)
            except SYNC_FAILURES as exc:  # cleared at a later round
                log.error("sync_ledger_write_failed", what="failures.clear", model=model, error=str(exc))
        actions = plan(
            deployments,
            installed.keys(),
            serving,
            self.pool.default_id,
            now,
            held_back(failures.values(), now.timestamp(), basis),
        )
        self._deferred = {a.model for a in actions if isinstance(a, Defer)}
        for action in actions:
            target = f"models/{action.model}/{action.version or 'newest'}"
            if isinstance(action, Missing):
                await self._report_once(
                    Event("deployment", Status.NOT_FOUND.value, target, "model is not installed")
                )
            elif isinstance(action, Defer):
                await self._report_once(
                    Event("deployment", Status.DEFERRED.value, target, f"waiting for window {action.window}")
                )
            elif isinstance(action, Activate):
                previous = failures.get(action.model)
                if previous is not None and previous.version != action.version:
                    previous = None
                await self._activate(action, installed[(action.model, action.version)], target, previous)
        try:
            await self._remove_undeployed(deployments)
        except SYNC_FAILURES as exc:  # the ledger: removal waits for the next round
            log.error("sync_removal_failed", error=str(exc))

    async def _remove_undeployed(self, deployments: list[Any]) -> None:
        """Unload what the deployments no longer name; delete unneeded versions after the grace."""
        store_dir = self.registry.store.dir.resolve()
        pool_models = [PoolModel(m.id, m.path.resolve().parent == store_dir) for m in self.pool.models()]
        for model in to_unload(deployments, pool_models, self.pool.default_id):
            if await self._remove_from_pool(model):
                self.serving_versions.pop(model, None)
                self._audit("deployment.unload", f"models/{model}", "ok", "not_deployed", {})
                await self.report(
                    Event("deployment", Status.UNLOADED.value, f"models/{model}", "no longer deployed")
                )
        installed = self._installed()
        serving = self._serving(installed)
        self._in_use = set(serving.items())
        keep = kept_versions(deployments, installed.keys(), serving, self.options.keep_previous)
        if keep is None:
            return
        now = self.now().timestamp()
        recorded = self.unneeded.all()
        since = unneeded_since(recorded, installed.keys(), keep, now)
        if since != recorded:
            self._record_unneeded(since)
        for model, version in due_for_removal(since, now, self.options.removal_grace_s, self._in_use):
            target = f"models/{model}/{version}"
            try:
                paths = await asyncio.to_thread(self.registry.remove, model, version)
            except RegistryError as exc:
                log.error("sync_remove_failed", target=target, error=str(exc))
                continue
            details = {"paths": paths, "unneeded_s": round(now - since.pop((model, version), now), 1)}
            self._record_unneeded(since)  # the delete happened: audited and reported even so
            self._audit("deployment.remove", target, "ok", "not_deployed", details)
            await self.report(
                Event(
                    "deployment", Status.REMOVED.value, target, f"deleted from the store: {', '.join(paths)}"
                )
            )

    def _record_unneeded(self, since: dict[tuple[str, str], float]) -> None:
        try:
            self.unneeded.replace(since)
        except SYNC_FAILURES as exc:  # the clocks are rewritten at the next round
            log.error("sync_ledger_write_failed", what="unneeded.replace", error=str(exc))

    async def _remove_from_pool(self, model: str) -> bool:
        remove = getattr(self.pool, "remove", None)
        if remove is None:  # a pool that cannot remove models keeps them
            return False
        try:
            return bool(await remove(model))
        except EngineError as exc:  # the default (it became so meanwhile): kept
            log.warning("sync_unload_refused", model=model, error=str(exc))
            return False

    async def _activate(
        self, action: Activate, info: ModelInfo, target: str, previous: Failure | None = None
    ) -> None:
        attempt = previous.attempts + 1 if previous is not None else 1
        try:
            # Re-hash just before loading: a blob altered on disk is refused, never served.
            await asyncio.to_thread(self.registry.store.verify, _sha_of(info), info.size_bytes, target)
            if action.make_default:
                await self.pool.swap(info, pin=False)
            else:
                register = getattr(self.pool, "register", None)
                if register is None:
                    await self.pool.swap(info)
                else:
                    register(info)
        except Exception as exc:
            reason = getattr(exc, "reason", "")
            status = {"smoke_failed": Status.SMOKE_TEST_FAILED, "refused": Status.MODEL_REFUSED}.get(
                reason, Status.LOAD_FAILED
            )
            self.health.activation(action.model, action.version, status.value)
            failure = after_failure(
                previous,
                action.model,
                action.version,
                str(exc)[:500],
                self.now().timestamp(),
                self._basis,
                self.options.retry,
                self.random(),
            )
            try:
                self.failures.put(failure)
            except SYNC_FAILURES as err:  # a broken ledger: retried at the next round instead
                log.error("sync_ledger_write_failed", what="failures.put", model=action.model, error=str(err))
            retry_at = datetime.fromtimestamp(failure.next_at, UTC).isoformat(timespec="seconds")
            self._audit(
                "deployment.activate",
                target,
                "failed",
                status.value,
                {"error": str(exc)[:500], "attempt": failure.attempts, "next_retry": retry_at},
            )
            detail = f"attempt {failure.attempts}, next retry {retry_at}: {exc}"
            await self.report(Event("deployment", status.value, target, detail[:1900]))
            return
        self._standing.pop(target, None)
        self.serving_versions[action.model] = action.version
        self.health.activation(action.model, action.version, "passed")
        self._forget_failure(action.model)
        self._audit(
            "deployment.activate",
            target,
            "ok",
            "activated",
            {"default": action.make_default, "attempt": attempt},
        )
        await self.report(Event("deployment", Status.ACTIVATED.value, target, f"serving (attempt {attempt})"))

    def _forget_failure(self, model: str) -> None:
        """A version of ``model`` activated: its failure record goes, whatever version failed."""
        try:
            if model in self.failures.all():
                self.failures.clear(model)
        except SYNC_FAILURES as exc:  # a broken ledger: the record is cleared at a later success
            log.error("sync_ledger_write_failed", what="failures.clear", model=model, error=str(exc))

    # --- reporting -------------------------------------------------------------------------------

    def _audit(
        self, action: str, resource: str | None, outcome: str, reason: str, details: dict[str, Any]
    ) -> None:
        recorder = self.audit
        submit = getattr(recorder, "submit", None)
        if submit is not None:
            try:
                submit(_entry(action, resource, outcome, reason, details))
            except Exception as exc:
                log.error("audit_submit_failed", error=str(exc))
        if self.uploader is not None:
            self.uploader.kick()

    def refused(self, reason: str, detail: str) -> None:
        """Registry and transfer refusals: into the audit log (from any thread)."""
        log.warning("sync_refused", reason=reason, detail=detail)
        self._audit("sync.refused", None, "refused", reason, {"detail": detail[:1000]})

    async def _report_once(self, event: Event) -> None:
        """Report a standing condition (deferred, missing) once, not at every round."""
        if self._standing.get(event.target) == event.status:
            return
        self._standing[event.target] = event.status
        await self.report(event)

    async def report(self, event: Event) -> None:
        """Persist ``event`` in the outbox (committed, in a worker thread) and return; publishing
        happens in the background (:meth:`_kick_flush`), so a caller never waits behind a backlog."""
        if not event.at:
            event = Event(event.kind, event.status, event.target, event.detail, time.time())
        log.info(
            "sync_event", kind=event.kind, status=event.status, target=event.target, detail=event.detail[:300]
        )
        try:
            await asyncio.to_thread(self.outbox.append, event)
        except SYNC_FAILURES as exc:  # a broken ledger must not stop the loop: the event is logged
            log.error("sync_event_not_persisted", error=str(exc))
            return
        self._kick_flush()

    def _kick_flush(self) -> None:
        """Have the outbox flushed in the background: one flusher task at a time; an event
        appended while it runs is picked up before it ends (``_flush_wanted``)."""
        self._flush_wanted = True
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_events())

    async def _flush_events(self) -> None:
        """Publish the outbox oldest first, until it is empty or the broker is gone."""
        async with self._flush_lock:
            self._flush_wanted = True
            while self._flush_wanted:
                self._flush_wanted = False
                await self._flush_outbox()

    async def _flush_outbox(self) -> None:
        """Publish the outbox oldest first, with at most :data:`EVENTS_IN_FLIGHT` events awaiting
        the hub's acknowledgement. An event leaves the outbox only when the hub says it stored it
        (``events/ack``, :meth:`_on_events_ack`), never on the broker's PUBACK: an event the broker
        accepted but no hub stored is sent again (same id) after ``event_ack_timeout_s``, and the
        hub stores each id once."""
        topic = device_topic(self.options.device_id, "events")
        timeout = self.options.event_ack_timeout_s
        while self.client.is_connected:
            now = time.monotonic()
            waiting = {i for i, sent in self._awaiting.items() if now - sent < timeout} | self._deleting
            room = EVENTS_IN_FLIGHT - len(waiting)
            if room <= 0:
                return
            try:
                batch = await asyncio.to_thread(self.outbox.pending, len(waiting) + min(room, 100))
            except SYNC_FAILURES as exc:
                log.error("sync_outbox_unreadable", error=str(exc))
                return
            due = [e for e in batch if e.id not in waiting][:room]
            if not due:
                return
            for event in due:
                first = event.id not in self._awaiting
                # awaiting before the publish: the hub's ack may overtake the PUBACK's handling
                self._awaiting[event.id] = time.monotonic()
                try:
                    await self.client.publish(Outgoing(topic, event.encode(), qos=1))
                except SYNC_FAILURES:  # not connected or no PUBACK: the rest waits for next time
                    self._awaiting.pop(event.id, None)
                    return
                if first:
                    self.events_sent.append(event)

    async def _on_events_ack(self, msg: Incoming) -> None:
        """The hub stored these events: forget the ones this device sent and awaits (an ack naming
        anything else, or retained, is ignored). Deletions of a burst of acks are one transaction,
        in a worker thread."""
        if msg.retain:
            return
        try:
            ack = EventAck.decode(msg.payload)
        except ProtocolError as exc:
            log.warning("event_ack_malformed", error=str(exc))
            return
        ids = [i for i in ack.ids if i in self._awaiting]
        if not ids:
            return
        for i in ids:
            del self._awaiting[i]
        self._acked_ids.extend(ids)
        self._deleting.update(ids)
        if self._ack_writer is None or self._ack_writer.done():
            self._ack_writer = asyncio.get_running_loop().create_task(self._write_acks())

    async def _write_acks(self) -> None:
        while self._acked_ids:
            await asyncio.sleep(0)  # let a burst of acks gather
            ids, self._acked_ids = self._acked_ids, []
            try:
                await asyncio.to_thread(self.outbox.acked, *ids)
            except SYNC_FAILURES as exc:  # they stay in the outbox and are sent again; stored once
                log.error("sync_outbox_ack_failed", error=str(exc))
            finally:
                self._deleting.difference_update(ids)
        self._kick_flush()  # room for more

    async def publish_state(self) -> None:
        enrollment = None
        with contextlib.suppress(RegistryError):
            enrollment = self.registry.enrollment()
        status = self.pool.status()
        report = build_report(
            self.options.device_id,
            agent_version=self.options.agent_version,
            groups=enrollment.groups if enrollment is not None else (),
            hardware=self.options.hardware,
            default_model=self.pool.default_id,
            loaded_models=[s.id for s in status if getattr(s, "state", "") == "ready"],
            installed=list(self.registry.index().targets),
            policy_version=self.policy_version(),
            audit_backlog=await asyncio.to_thread(self.audit.backlog) if self.audit is not None else 0,
            last_sync=self.last_sync,
            at=time.time(),
            failing=await asyncio.to_thread(self._failing_report),
            health=self.health.report(),
            serving=self._serving(self._installed()),
            **await asyncio.to_thread(self._outbox_counts),
        )
        await self.state.publish(report)

    def _failing_report(self) -> list[dict[str, object]]:
        try:
            return [f.to_report() for f in self.failures.all().values() if f.basis == self._basis]
        except SYNC_FAILURES as exc:
            log.error("sync_ledger_unreadable", error=str(exc))
            return []

    def _outbox_counts(self) -> dict[str, int]:
        try:
            return {"events_pending": len(self.outbox), "events_dropped": self.outbox.dropped}
        except SYNC_FAILURES as exc:
            log.error("sync_outbox_unreadable", error=str(exc))
            return {}

    async def wait_rounds(self, n: int, timeout: float) -> None:
        """Wait until at least ``n`` sync rounds ran (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while self.rounds < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.rounds} sync rounds after {timeout}s")
            await asyncio.sleep(0.05)


def _sha_of(info: ModelInfo) -> str:
    return info.path.name


def _document_version(raw: bytes) -> int:
    import json

    try:
        value = json.loads(raw).get("version", 0)
    except (ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def options_from_settings(settings: Any, device_id: str, **extra: Any) -> SyncOptions:
    """SyncOptions from ``agent.config.Settings`` (its ``[hub]`` and ``[sync]`` sections)."""
    h = settings.hub
    y = settings.sync
    mqtt = MqttConfig(
        host=h.host,
        port=h.port,
        client_id=device_id,
        ca_file=h.ca_file,
        cert_file=h.cert_file,
        key_file=h.key_file,
        keepalive_s=h.keepalive_s,
        session_expiry_s=h.session_expiry_s,
        backoff_min_s=h.backoff_min_s,
        backoff_max_s=h.backoff_max_s,
        will=offline_will(device_id),
    )
    return SyncOptions(
        device_id=device_id,
        mqtt=mqtt,
        refresh_interval_s=h.refresh_interval_s,
        chunk_window=h.chunk_window,
        chunk_timeout_s=h.chunk_timeout_s,
        audit_batch=h.audit_batch,
        state_interval_s=h.state_interval_s,
        outbox_capacity=y.outbox_max_events,
        retry=RetryPolicy(y.retry_initial_s, y.retry_max_s, y.retry_jitter),
        keep_previous=y.keep_previous,
        removal_grace_s=y.removal_grace_s,
        mirrors=tuple(h.mirrors),
        mirror_ca_file=h.mirror_ca_file,
        mirror_timeout_s=h.mirror_timeout_s,
        max_download_bytes_per_s=h.max_download_bytes_per_s,
        download_window=h.download_window,
        **extra,
    )


__all__ = [
    "AuditRecorder",
    "ServingPool",
    "SyncOptions",
    "SyncService",
    "options_from_settings",
]
