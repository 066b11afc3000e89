"""``edge-hub serve``: the hub's MQTT side.

One process (role ``all``) publishes the repository metadata retained and keeps it current
(polling the metadata directory, so CLI pushes from other processes go out within
``meta_poll_s``), announces its presence (retained ``repo/meta/hub.presence``, a fresh session
after every connect once its subscriptions are in place; its Last Will says offline) so devices
ask again at once what they asked while it was away, re-signs the timestamp on a schedule
(apscheduler), drives the staged rollouts stored in the database (every ``rollout_interval_s``,
hub/rollout/controller.py), answers chunk requests, stores audit batches, state and events in the hub
database. ``blob_workers`` extra processes (role ``blobs``) answer chunk requests too: all of
them share ``$share/hub/edge/v1/repo/blobs/get`` so the broker spreads the requests.

Several hosts: any number of role-``all`` processes may serve one fleet against one database
(PostgreSQL; SQLite: the processes of one host). All of them store what devices send (audit
batches and events arrive on shared subscriptions, so each goes to one of them; state and status on
plain ones, written by each, idempotently) and answer chunk requests; none keeps state another
needs. The jobs only one may do — publish the retained metadata, re-sign the timestamp, drive the
rollouts, announce presence — are the *leader*'s (hub/sync/leader.py: a PostgreSQL advisory lock
or a file lock), checked every ``leader_check_s``; when the leader dies another takes over and
announces a fresh presence session. Every worker connects with the offline presence as its Last
Will (the broker cannot know which one leads): when a non-leader's will fires, the leader, which
watches the retained presence, announces itself again.

Lifecycle: start -> run until SIGTERM/SIGINT -> close the MQTT clients and stop the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fleet.errors import MqttError, ProtocolError
from fleet.log import get_logger
from fleet.messages import HUB_PRESENCE, HubPresence, Incoming, Outgoing, meta_topic
from fleet.mqtt import MqttClient, MqttConfig
from hub.sync.blobs import BlobIndex, BlobServer
from hub.sync.collect import Collector
from hub.sync.leader import Leadership
from hub.sync.meta import MetaPublisher, refresh_timestamp
from hub.sync.rescue import Outcome, Rescue, take_over
from hub.sync.store import HubStore
from hub.sync.workers import Watch, WorkerRegistry

if TYPE_CHECKING:
    from hub.rollout.controller import RolloutController

log = get_logger(__name__)


LEADER_CHECK_S = 2.0


@dataclass(frozen=True, slots=True)
class ServeConfig:
    repo: Path
    db: Path | str
    """a SQLite file or a ``postgresql://`` URL (hub/sync/db.py)"""
    mqtt: MqttConfig
    role: str = "all"
    blob_workers: int = 0
    timestamp_interval_s: float = 6 * 3600.0
    meta_poll_s: float = 2.0
    passphrase: bytes | None = None
    rollout_interval_s: float = 5.0
    """How often the rollout controller looks at the stored rollouts (hub/rollout/controller.py)."""
    leader_check_s: float = LEADER_CHECK_S
    """How often a worker checks (or takes) the leader's role (hub/sync/leader.py) and renews its
    row in the workers' registry (hub/sync/workers.py)."""
    leave_timeout_s: float = 20.0
    """On SIGTERM: the longest a worker spends handling what its session was already given after
    leaving its subscriptions (fleet/mqtt.py ``MqttClient.leave``)."""
    worker_stale_s: float = 15.0
    """A worker whose registry row is older than this is gone: the leader takes its session over
    (hub/sync/rescue.py)."""


class HubServer:
    """The running hub (one process)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        mqtt = config.mqtt
        if config.role == "all" and mqtt.will is None:
            mqtt = replace(mqtt, will=presence(False, ""))
        self.client = MqttClient(mqtt)
        self.session = ""
        """The presence session announced last ("" before the first)."""
        self.blobs = BlobServer(self.client, BlobIndex(config.repo / "targets"))
        self.meta: MetaPublisher | None = None
        self.collector: Collector | None = None
        self.store: HubStore | None = None
        self.rollouts: RolloutController | None = None
        self.leadership: Leadership | None = None
        self.registry: WorkerRegistry | None = None
        self._watch = Watch(config.worker_stale_s)
        self._rescues: dict[str, asyncio.Task[None]] = {}
        self._rescue_after: dict[str, float] = {}
        """client id -> wall time before which it is not taken over again (it took its session back)."""
        self.rescued: list[tuple[str, Rescue]] = []
        """Sessions this worker took over (tests, logs)."""
        self._stop = asyncio.Event()
        self._announcing = asyncio.Lock()
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self._scheduler: object | None = None
        self._workers: list[subprocess.Popen[bytes]] = []

    def request_stop(self) -> None:
        self._stop.set()

    async def start(self) -> None:
        """Register every subscription, then connect: a worker that resumes its session (restarted
        with the same client id) is sent the messages the broker kept for it right after CONNACK,
        and each must find its handler (fleet/mqtt.py)."""
        c = self.config
        await self.blobs.start()
        if c.role == "all":
            self.store = await asyncio.to_thread(HubStore, c.db)
            self.leadership = Leadership(self.store.db)
            self.registry = WorkerRegistry(self.store.db)
            await self._heartbeat()
            self.meta = MetaPublisher(self.client, c.repo)
            self.collector = Collector(self.client, self.store)
            await self.collector.start()
            await self.client.subscribe(meta_topic(HUB_PRESENCE), self._on_presence, qos=1)
            from hub.rollout.controller import RolloutController, repo_signer

            self.rollouts = RolloutController(self.store, repo_signer(c.repo, c.passphrase))
            self._tasks.append(asyncio.get_running_loop().create_task(self._drive_rollouts()))
            self.client.on_connect(self._republish)
            self._tasks.append(asyncio.get_running_loop().create_task(self._poll_meta()))
            self._start_scheduler()
            for i in range(c.blob_workers):
                self._workers.append(self._spawn_worker(i))
            self.client.on_connect(self._announce)
            await self._check_leader()  # not connected yet: the on-connect hooks publish
            self._tasks.append(asyncio.get_running_loop().create_task(self._lead()))
        await self.client.start()

    @property
    def leading(self) -> bool:
        return self.leadership is not None and self.leadership.leading

    async def _check_leader(self) -> None:
        """Take or keep the leader's role; on taking it, publish the metadata and announce."""
        assert self.leadership is not None
        was = self.leadership.leading
        now = await asyncio.to_thread(self.leadership.held)
        if now and not was and self.client.is_connected:
            await self._republish(True)
            await self._announce(True)

    async def _lead(self) -> None:
        while True:
            await asyncio.sleep(self.config.leader_check_s)
            try:
                await self._check_leader()
            except Exception as exc:
                log.error("hub_leader_check_failed", error=repr(exc))
            await self._heartbeat()
            self._supervise_blob_workers()
            if self.leading and not self._closing:
                try:
                    await self._take_over_stale()
                except Exception as exc:
                    log.error("hub_worker_check_failed", error=repr(exc))

    async def _heartbeat(self) -> None:
        """Renew this worker's registry row (hub/sync/workers.py)."""
        assert self.registry is not None
        now = time.time()
        try:
            await asyncio.to_thread(
                self.registry.seen, self.config.mqtt.client_id, socket.gethostname(), os.getpid(), now
            )
        except Exception as exc:
            self._watch.failed()
            log.warning("hub_worker_heartbeat_failed", error=repr(exc))
            return
        self._watch.wrote(now)

    async def _take_over_stale(self) -> None:
        """The leader: take over the session of every worker whose row went stale."""
        assert self.registry is not None
        now = time.time()
        if not self._watch.may_judge(now):
            return
        stale = await asyncio.to_thread(self.registry.stale, now - self.config.worker_stale_s)
        for client_id, host, pid, seen in stale:
            if client_id == self.config.mqtt.client_id or client_id in self._rescues:
                continue
            if self._rescue_after.get(client_id, 0.0) > now:
                continue
            silent = round(now - seen, 1)
            log.warning("hub_worker_gone", worker=client_id, host=host, pid=pid, silent_s=silent)
            task = asyncio.get_running_loop().create_task(self._rescue(client_id))
            self._rescues[client_id] = task
            task.add_done_callback(functools.partial(self._rescue_done, client_id))

    def _rescue_done(self, client_id: str, _task: asyncio.Task[None]) -> None:
        self._rescues.pop(client_id, None)

    async def _rescue(self, client_id: str) -> None:
        assert self.store is not None and self.registry is not None
        c = self.config
        try:
            result = await take_over(c.mqtt, client_id, self.store, c.repo, timeout=c.leave_timeout_s)
        except Exception as exc:
            log.error("hub_worker_takeover_failed", worker=client_id, error=repr(exc))
            return
        self.rescued.append((client_id, result))
        log.info(
            "hub_worker_taken_over", worker=client_id, outcome=result.outcome.value, handled=result.handled
        )
        if result.outcome is Outcome.ENDED:
            await asyncio.to_thread(self.registry.gone, client_id, time.time() - c.worker_stale_s)
        elif result.outcome is Outcome.TAKEN_BACK:
            self._rescue_after[client_id] = time.time() + c.worker_stale_s

    def _supervise_blob_workers(self) -> None:
        """Start again a blob worker that exited while this process serves (same client id: it
        resumes its session and answers what the broker kept for it)."""
        for i, proc in enumerate(self._workers):
            if self._closing or proc.poll() is None:
                continue
            log.warning("hub_blob_worker_exited", index=i, returncode=proc.returncode)
            self._workers[i] = self._spawn_worker(i)

    async def _on_presence(self, msg: Incoming) -> None:
        """The leader keeps the retained presence true: another worker's Last Will said offline.

        A *retained* offline presence (sent on subscribing, i.e. on every reconnect) needs no
        answer: the leader announces after every connect anyway (``_announce`` hook) and on taking
        the role; answering it too made one broker restart announce two or three sessions, and
        every box re-asks its chunk requests per announce."""
        if not self.leading or not msg.payload or self._closing or msg.retain:
            return
        try:
            seen = HubPresence.decode(msg.payload)
        except ProtocolError:
            return
        if not seen.online:
            await self._announce(True)

    async def _announce(self, _session_present: bool) -> None:
        """Presence (the leader's): online, with a new session (subscriptions are renewed before
        hooks run)."""
        if not self.leading:
            return
        async with self._announcing:  # one at a time: each logs the session it published
            session = os.urandom(8).hex()
            try:
                await self.client.publish(presence(True, session))
            except MqttError as exc:
                log.warning("hub_presence_failed", error=str(exc))
                return
            self.session = session
            log.info("hub_presence", session=session)

    def _spawn_worker(self, i: int) -> subprocess.Popen[bytes]:
        c = self.config
        argv = [
            sys.executable, "-m", "hub.sync.worker",
            "--role", "blobs", "--repo", str(c.repo),
            "--host", c.mqtt.host, "--port", str(c.mqtt.port),
            "--ca", str(c.mqtt.ca_file), "--cert", str(c.mqtt.cert_file), "--key", str(c.mqtt.key_file),
            "--client-id", f"{c.mqtt.client_id}-blobs-{i}",
            "--backoff-min", str(c.mqtt.backoff_min_s), "--backoff-max", str(c.mqtt.backoff_max_s),
            "--leave-timeout", str(c.leave_timeout_s), "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        # the database goes by environment (a URL may name a password; argv is public)
        return subprocess.Popen(argv, env={**os.environ, "EDGE_HUB_DB": str(c.db)})

    def _start_scheduler(self) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        scheduler = AsyncIOScheduler(event_loop=asyncio.get_running_loop())
        scheduler.add_job(
            self.resign_timestamp,
            "interval",
            seconds=self.config.timestamp_interval_s,
            id="timestamp",
            max_instances=1,
            coalesce=True,
        )
        scheduler.start()
        self._scheduler = scheduler

    async def resign_timestamp(self) -> None:
        if self.config.role == "all" and not self.leading:
            return
        try:
            version = await asyncio.to_thread(refresh_timestamp, self.config.repo, self.config.passphrase)
        except Exception as exc:
            log.error("timestamp_refresh_failed", error=str(exc))
            return
        log.info("timestamp_refreshed", version=version)
        if self.meta is not None and self.client.is_connected:
            await self.meta.sync()

    async def _republish(self, _session_present: bool) -> None:
        if self.meta is not None and self.leading:
            await self.meta.sync(force=True)

    async def _drive_rollouts(self) -> None:
        """The rollout controller's periodic tick (signing happens off the event loop)."""
        assert self.rollouts is not None
        while True:
            await asyncio.sleep(self.config.rollout_interval_s)
            if not self.leading:
                continue
            try:
                await asyncio.to_thread(self.rollouts.tick)
            except Exception as exc:
                log.error("rollout_tick_failed", error=repr(exc))

    async def _poll_meta(self) -> None:
        assert self.meta is not None
        while True:
            await asyncio.sleep(self.config.meta_poll_s)
            if self.client.is_connected and self.leading:
                try:
                    await self.meta.sync()
                except Exception as exc:
                    log.warning("meta_sync_failed", error=str(exc))

    async def close(self) -> None:
        """Leave the broker's subscriptions, handle what this worker's session was already given,
        then stop; the session and the registry row end only when that went quiet (otherwise the
        worker's return or the leader's take-over handles the rest, hub/sync/rescue.py)."""
        self._closing = True
        left = None
        if self.client.is_connected:
            for proc in self._workers:
                proc.terminate()  # the blob workers leave their sessions at the same time
            left = await self.client.leave(timeout=self.config.leave_timeout_s)
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)  # type: ignore[attr-defined]
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for proc in self._workers:
            proc.terminate()
        for proc in self._workers:
            try:
                await asyncio.to_thread(proc.wait, self.config.leave_timeout_s + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for task in list(self._rescues.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.blobs.close()
        if self.config.role == "all" and self.leading and self.client.is_connected:
            with contextlib.suppress(MqttError):  # another worker takes over and announces itself
                await self.client.publish(presence(False, ""), timeout=2)
        ended = left is not None and left.complete
        await self.client.close(end_session=ended)
        if ended and self.registry is not None:
            with contextlib.suppress(Exception):  # a stale row is taken over, handling nothing
                await asyncio.to_thread(self.registry.gone, self.config.mqtt.client_id)
        if self.collector is not None:
            await self.collector.close()
        if self.leadership is not None:
            self.leadership.release()
        if self.store is not None:
            self.store.close()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        for sig in previous:
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            log.info(
                "hub_serving",
                role=self.config.role,
                broker=f"{self.config.mqtt.host}:{self.config.mqtt.port}",
            )
            await self._stop.wait()
        finally:
            await self.close()
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)
        return 0


def presence(online: bool, session: str) -> Outgoing:
    """The retained presence message (also the role-``all`` hub's Last Will, offline)."""
    return Outgoing(
        meta_topic(HUB_PRESENCE), HubPresence(online, session, time.time()).encode(), qos=1, retain=True
    )


__all__ = ["LEADER_CHECK_S", "HubServer", "ServeConfig", "presence"]
