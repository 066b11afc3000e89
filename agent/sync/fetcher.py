"""The MQTT implementation of the registry's fetcher interface (:mod:`registry.fetch`).

Two kinds of file, two mechanisms (docs/protocol.md):

- ``registry:/metadata/<name>``: the hub publishes every metadata file *retained* on
  ``edge/v1/repo/meta/<name>`` plus an ``index.json`` listing them. :class:`RetainedMetadata`
  keeps one subscription to ``edge/v1/repo/meta/#`` and a cache of what arrived; a file the index
  does not list is answered at once with HTTP-404 semantics (python-tuf relies on that to find the
  newest root). Nothing is verified here: python-tuf does it in :mod:`registry.device`.
- ``registry:/targets/<dir>/<sha256>.<name>``: fetched chunk by chunk by :class:`ChunkTransfer`,
  requests on ``edge/v1/repo/blobs/get`` (QoS 1) with MQTT 5 response topic
  ``edge/v1/devices/<id>/blobs`` and correlation data ``<sha256>:<index>``, at most ``window``
  outstanding.

Invariants of a transfer:
- The chunk plan (length, chunk size, per-chunk sha256) comes from the device's *trusted* targets
  metadata (written by python-tuf only after verification), never from the network message.
- A chunk is written to the partial file only after its sha256 equals the signed chunk hash; a
  chunk that does not is refused and reported through ``on_refusal`` (-> audit log); the request
  stays in flight for the genuine reply, and a chunk that never arrives intact is asked again after
  ``chunk_timeout_s`` without any progress, at most ``max_attempts`` times.
- The partial file ``<partial_dir>/<sha256>.part`` survives disconnects and restarts (even
  SIGKILL): on start every chunk already in it is re-hashed, the good ones are kept, so a transfer
  resumes and a torn write is simply fetched again. It is never visible as a model: with
  :class:`AdoptingStore` (what the agent uses) the complete partial file is checked as a whole
  against the signed sha256, fsynced, made read-only and renamed into the store; through the
  generic fetcher path the verified chunks are streamed, in order and while the transfer runs,
  into the store's own atomic install, and the partial file is deleted afterwards.
- Free disk is checked before the first request: what is still missing plus one full copy (the
  store's install) must fit, with a margin.
- Each chunk is requested once per attempt; after a reconnect only the chunks that were in flight
  (at most one window) are asked again, and so when the hub's presence comes back live
  (``repo/meta/hub.presence``, a new session): requests sent while no hub worker was subscribed
  were lost, so they are asked again at once instead of after ``chunk_timeout_s``.
- Progress is visible: ``sync_transfer_started`` / ``_progress`` (every ``progress_interval_s``)
  / ``_done`` / ``_failed`` log lines carry the chunks, bytes, resumed and re-asked chunks, and
  :class:`TransferTotals` counts them for the metrics.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import os
import shutil
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuf.api.exceptions import DownloadHTTPError

from agent.sync import mirror
from agent.sync.errors import TransferError
from agent.sync.gate import DownloadWindowClosed, TransferGate
from fleet.errors import MqttError, ProtocolError
from fleet.log import get_logger
from fleet.messages import (
    BLOB_REQUESTS,
    HUB_PRESENCE,
    META_INDEX,
    META_PREFIX,
    ChunkRequest,
    HubPresence,
    Incoming,
    MetaIndex,
    Outgoing,
    Status,
    device_topic,
    parse_correlation,
)
from fleet.mqtt import MqttClient
from registry.device import DeviceRegistry
from registry.exceptions import Refused
from registry.fetch import METADATA_BASE, TARGETS_BASE, RegistryFetcher
from registry.files import fsync_dir, translate_os_error
from registry.store import BlobStore
from registry.trust import BlobVerifier

log = get_logger(__name__)

RefusalSink = Callable[[str, str], None]
DISK_MARGIN_BYTES = 64 << 20
MIRROR_MAX_BAD_CHUNKS = 3
"""Chunks of wrong bytes after which a mirror is skipped for the rest of a transfer (each bad
chunk is fetched from the next source either way)."""
MIRROR_BENCH_S = 300.0
"""A mirror skipped by a transfer is not asked by the next transfers for this long (a hung mirror
would otherwise cost ``mirror_timeout_s`` per target)."""
MIRROR_SPAN_BYTES = 64 << 20
"""Bytes asked in one range request when no rate limit applies (with one: one chunk per request,
so the bytes on the wire, not only those written, keep to the rate)."""


def _no_refusal_sink(reason: str, detail: str) -> None:
    log.warning("sync_refused", reason=reason, detail=detail)


# --- metadata --------------------------------------------------------------------------------


class RetainedMetadata:
    """Cache of the retained metadata messages under ``edge/v1/repo/meta/``."""

    def __init__(self, client: MqttClient, *, wait_s: float = 10.0) -> None:
        self.client = client
        self.wait_s = wait_s
        self.files: dict[str, bytes] = {}
        self.index: MetaIndex | None = None
        self._changed = asyncio.Event()
        self.on_timestamp: Callable[[], None] | None = None
        """Called when a new ``timestamp.json`` arrives (the agent schedules a refresh)."""
        self.hub_online: bool | None = None
        """The hub's last announced presence (None before any)."""
        self.hub_session = ""
        self.on_hub_back: Callable[[], None] | None = None
        """Called when the hub announces itself live (it just (re)connected, subscriptions in
        place); not for the retained copy a (re)subscription delivers."""

    async def start(self) -> None:
        await self.client.subscribe(META_PREFIX + "#", self._on_message, qos=1)

    def _on_presence(self, msg: Incoming) -> None:
        try:
            presence = HubPresence.decode(msg.payload)
        except ProtocolError as exc:
            log.warning("sync_bad_hub_presence", error=str(exc))
            return
        was, self.hub_online = self.hub_online, presence.online
        if not presence.online:
            if was is not False:  # a retained copy delivered again on a resubscription says nothing new
                log.info("sync_hub_offline")
            return
        fresh = presence.session != self.hub_session
        self.hub_session = presence.session
        if fresh and not msg.retain:
            log.info("sync_hub_back", session=presence.session)
            if self.on_hub_back is not None:
                self.on_hub_back()

    def _on_message(self, msg: Incoming) -> None:
        name = msg.topic.removeprefix(META_PREFIX)
        if name == HUB_PRESENCE:
            if msg.payload:
                self._on_presence(msg)
            return
        if name == META_INDEX:
            try:
                self.index = MetaIndex.decode(msg.payload) if msg.payload else None
            except ProtocolError as exc:
                log.warning("sync_bad_meta_index", error=str(exc))
                return
        elif msg.payload:
            changed = self.files.get(name) != msg.payload
            self.files[name] = msg.payload
            if changed and name == "timestamp.json" and self.on_timestamp is not None:
                self.on_timestamp()
        else:
            self.files.pop(name, None)  # an empty retained message clears the file
        self._changed.set()
        self._changed = asyncio.Event()

    async def get(self, name: str) -> bytes | None:
        """The file's bytes, or None when the hub does not publish it."""
        deadline = time.monotonic() + self.wait_s
        while True:
            index = self.index
            if name in self.files and (index is None or name in index.files):
                return self.files[name]
            if index is not None and name not in index.files:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if index is None:
                    raise TransferError("no metadata index from the hub", status=Status.TIMEOUT.value)
                raise TransferError(f"metadata {name} did not arrive", status=Status.TIMEOUT.value)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


# --- chunk plans -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkPlan:
    """What the signed metadata says about one blob."""

    sha256: str
    length: int
    chunk_size: int
    chunk_sha256: tuple[str, ...]
    file: str = ""
    """The target's file under the repository's ``targets/`` (``<dir>/<sha256>.<name>``): its
    path on an HTTP mirror; empty when unknown (then no mirror is asked)."""

    @property
    def count(self) -> int:
        return len(self.chunk_sha256)

    def span(self, index: int) -> tuple[int, int]:
        offset = index * self.chunk_size
        return offset, min(self.chunk_size, self.length - offset)


def target_file(target_path: str, sha256: str) -> str:
    """``models/m/1/m.gguf`` -> ``models/m/1/<sha256>.m.gguf`` (the consistent-snapshot name)."""
    directory, _, name = target_path.rpartition("/")
    return f"{directory}/{sha256}.{name}" if directory else f"{sha256}.{name}"


def plan_from_target(length: int, sha256: str, custom: Mapping[str, Any], target_path: str = "") -> ChunkPlan:
    """Chunk plan of a verified target: the manifest's chunk hashes, or one chunk for documents."""
    file = target_file(target_path, sha256) if target_path else ""
    for key in ("manifest", "file"):
        body = custom.get(key)
        if isinstance(body, Mapping) and isinstance(body.get("chunk_sha256"), list):
            chunks = tuple(str(c) for c in body["chunk_sha256"])
            size = int(body["chunk_size"])
            if int(body.get("file_size", length)) != length or -(-length // size) != len(chunks):
                raise TransferError(f"chunk plan of {sha256[:16]} is inconsistent", status="bad_request")
            return ChunkPlan(sha256, length, size, chunks, file)
    if length > 16 << 20:
        raise TransferError(f"target {sha256[:16]} has no chunk hashes", status="bad_request")
    return ChunkPlan(sha256, length, max(length, 1), (sha256,), file)


def trusted_plans(metadata_dir: Path) -> Callable[[str], ChunkPlan]:
    """Look plans up in the trusted ``targets.json`` python-tuf persisted after verifying it."""

    def lookup(sha256: str) -> ChunkPlan:
        raw = (metadata_dir / "targets.json").read_bytes()
        targets = json.loads(raw)["signed"]["targets"]
        for path, info in targets.items():
            if info.get("hashes", {}).get("sha256") == sha256:
                return plan_from_target(int(info["length"]), sha256, info.get("custom") or {}, path)
        raise TransferError(f"{sha256[:16]} is not a trusted target", status=Status.NOT_FOUND.value)

    return lookup


# --- transfer --------------------------------------------------------------------------------


@dataclass
class TransferTotals:
    """Running totals over every transfer of one fetcher (what the metrics export)."""

    bytes_received: int = 0
    chunks_requested: int = 0
    chunks_resumed: int = 0
    reasked: collections.Counter[str] = field(default_factory=collections.Counter)
    """Requests asked again, by reason: ``timeout``, ``reconnect``, ``hub_back``, ``not_found``."""
    active: int = 0
    mirror_bytes: int = 0
    """Verified bytes that came from HTTP mirrors (included in ``bytes_received``)."""
    mirror_bad_chunks: int = 0
    """Chunks a mirror served with wrong bytes (refused, fetched from the next source)."""
    mirror_skipped: collections.Counter[str] = field(default_factory=collections.Counter)
    """Mirrors given up on for a transfer, by reason (:data:`agent.sync.mirror.MIRROR_REASONS`)."""
    gate: TransferGate | None = None
    """The box's download window and rate limit (``gate.waiting`` says why a transfer waits)."""


@dataclass
class TransferStats:
    requested: collections.Counter[int] = field(default_factory=collections.Counter)
    """How many times each chunk index was requested (requests the broker acknowledged)."""
    reasked: collections.Counter[str] = field(default_factory=collections.Counter)
    """Requests asked again, by reason (as :attr:`TransferTotals.reasked`)."""
    resumed_chunks: int = 0
    duplicates: int = 0
    """Chunks received again after they were already verified and written."""
    refused_chunks: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    mirror_chunks: int = 0
    """Chunks that came, verified, from HTTP mirrors."""
    mirror_bad_chunks: int = 0
    mirror_skipped: list[tuple[str, str]] = field(default_factory=list)
    """(mirror, reason) of each mirror given up on."""


class ChunkTransfer:
    """Fetch one blob into ``<partial_dir>/<sha256>.part``, verified chunk by chunk."""

    def __init__(
        self,
        client: MqttClient,
        device_id: str,
        plan: ChunkPlan,
        partial_dir: Path,
        *,
        window: int = 4,
        chunk_timeout_s: float = 30.0,
        max_attempts: int = 8,
        on_refusal: RefusalSink = _no_refusal_sink,
        on_progress: Callable[[int, int], None] | None = None,
        adopted: bool = False,
        totals: TransferTotals | None = None,
        progress_interval_s: float = 10.0,
        mirrors: Sequence[str] = (),
        gate: TransferGate | None = None,
        mirror_timeout_s: float = 10.0,
        mirror_ssl: ssl.SSLContext | None = None,
        on_mirror_skipped: Callable[[str, str], None] | None = None,
    ) -> None:
        self.client = client
        self.on_mirror_skipped = on_mirror_skipped
        self.mirrors = tuple(mirrors)
        """Mirror base URLs, asked in order before MQTT (each a copy of the repo's ``targets/``)."""
        self.gate = gate if gate is not None else TransferGate()
        self.mirror_timeout_s = mirror_timeout_s
        self.mirror_ssl = mirror_ssl
        self.totals = totals if totals is not None else TransferTotals()
        self.progress_interval_s = progress_interval_s
        self._logged_at = 0.0
        self.running = False
        self.finished = False
        self.device_id = device_id
        self.plan = plan
        self.adopted = adopted
        """The partial file becomes the store's blob (renamed): no second copy needs disk space."""
        self.path = partial_dir / f"{plan.sha256}.part"
        self.window = max(1, window)
        self.chunk_timeout_s = chunk_timeout_s
        self.max_attempts = max_attempts
        self.on_refusal = on_refusal
        self.on_progress = on_progress
        self.stats = TransferStats()
        self._have: set[int] = set()
        self._cond = threading.Condition()
        self.ready = threading.Event()
        """Set once the partial file exists at its full length (readers may open it)."""
        self._inflight: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._fd = -1
        self._last_status: str | None = None
        self._failure: TransferError | None = None
        self._last_progress = time.monotonic()
        self._retry_at: dict[int, float] = {}

    @property
    def reply_topic(self) -> str:
        return device_topic(self.device_id, "blobs")

    def _resume(self) -> None:
        """Keep every chunk already in the partial file whose hash matches the plan."""
        size = os.fstat(self._fd).st_size
        for i in range(self.plan.count):
            offset, length = self.plan.span(i)
            if offset + length > size:
                break
            data = os.pread(self._fd, length, offset)
            if len(data) == length and hashlib.sha256(data).hexdigest() == self.plan.chunk_sha256[i]:
                self._have.add(i)
        self.stats.resumed_chunks = len(self._have)
        self.totals.chunks_resumed += len(self._have)
        self._notify()

    def _check_disk(self) -> None:
        missing = sum(self.plan.span(i)[1] for i in range(self.plan.count) if i not in self._have)
        need = missing + (0 if self.adopted else self.plan.length) + DISK_MARGIN_BYTES
        free = shutil.disk_usage(self.path.parent).free
        if free < need:
            raise TransferError(
                f"{need} bytes needed for {self.plan.sha256[:16]}, {free} free", status=Status.DISK_FULL.value
            )

    def _on_reply(self, msg: Incoming) -> None:
        try:
            sha, index = parse_correlation(msg.correlation)
        except ProtocolError:
            return
        if sha != self.plan.sha256 or not 0 <= index < self.plan.count:
            return
        if index in self._have:
            self.stats.duplicates += 1  # fetched again (a re-request crossed the first reply)
            return
        status = msg.prop("status") or Status.OK.value
        if status != Status.OK.value:
            # A worker whose view of the repository lags (a blob published a moment ago) says
            # not_found: ask again in a second, at most ``max_attempts`` times in all.
            self._last_status = status
            if self._inflight.pop(index, None) is not None:
                self._retry_at[index] = time.monotonic() + 1.0
                self._reasked("not_found")
                self._check_attempts(index)
            self._wake.set()
            return
        # Refused and reported when wrong; the request stays in flight: the real reply may still
        # come (a forged one does not cost a new request). A chunk that never arrives intact is
        # asked again after the timeout, at most ``max_attempts`` times.
        self.accept(index, msg.payload)

    def accept(self, index: int, data: bytes, mirror_url: str | None = None) -> bool:
        """Write chunk ``index`` if ``data`` is exactly its signed bytes (length and sha256) and
        return True; else refuse it (``on_refusal``, audit log) and return False. The one check
        every source goes through: MQTT replies and mirror reads alike."""
        sha = self.plan.sha256
        offset, length = self.plan.span(index)
        if len(data) != length or hashlib.sha256(data).hexdigest() != self.plan.chunk_sha256[index]:
            source = f" from mirror {mirror_url}" if mirror_url else ""
            if mirror_url:
                self.stats.mirror_bad_chunks += 1
                self.totals.mirror_bad_chunks += 1
            else:
                self.stats.refused_chunks += 1
            self.on_refusal(
                Status.CHUNK_HASH_MISMATCH.value,
                f"chunk {index} of {sha[:16]}{source}: {len(data)} bytes do not match the signed chunk hash",
            )
            return False
        if index in self._have:
            return True
        written = os.pwrite(self._fd, data, offset)
        if written != length:
            raise TransferError(f"short write of chunk {index}", status=Status.ERROR.value)
        self._have.add(index)
        self._notify()
        self._inflight.pop(index, None)
        self.stats.bytes_received += length
        self.totals.bytes_received += length
        self._last_progress = time.monotonic()
        if self.on_progress is not None:
            self.on_progress(len(self._have), self.plan.count)
        if mirror_url:
            self.stats.mirror_chunks += 1
            self.totals.mirror_bytes += length
        if self._last_progress - self._logged_at >= self.progress_interval_s:
            self._log("sync_transfer_progress")
        self._wake.set()
        return True

    def _reasked(self, reason: str, n: int = 1) -> None:
        self.stats.reasked[reason] += n
        self.totals.reasked[reason] += n

    def _log(self, event: str, **extra: Any) -> None:
        self._logged_at = time.monotonic()
        log.info(
            event,
            blob=self.plan.sha256[:16],
            chunks=f"{len(self._have)}/{self.plan.count}",
            bytes_received=self.stats.bytes_received,
            resumed_chunks=self.stats.resumed_chunks,
            reasked=dict(self.stats.reasked),
            in_flight=len(self._inflight),
            **extra,
        )

    def reask_now(self) -> int:
        """The hub just (re)connected: what is in flight may have gone to a shared subscription
        with no live member, so ask it all again now (counted as attempts, reason ``hub_back``).
        Returns how many requests that is."""
        n = len(self._inflight)
        for index in list(self._inflight):
            del self._inflight[index]
            self._retry_at[index] = 0.0
        if n:
            self._reasked("hub_back", n)
            log.info("sync_transfer_reask", blob=self.plan.sha256[:16], reason="hub_back", requests=n)
        self._wake.set()
        return n

    async def _request(self, index: int) -> None:
        offset, length = self.plan.span(index)
        req = ChunkRequest(self.plan.sha256, index, offset, length)
        self._inflight[index] = time.monotonic()
        try:
            await self.client.publish(
                Outgoing(
                    BLOB_REQUESTS,
                    req.encode(),
                    qos=1,
                    response_topic=self.reply_topic,
                    correlation=req.correlation,
                )
            )
        except MqttError:
            # Not acknowledged (the connection dropped): not counted, asked again once connected.
            self._inflight.pop(index, None)
            raise
        self.stats.requested[index] += 1
        self.totals.chunks_requested += 1

    async def run(self) -> Path:
        """Fetch the missing chunks; return the partial file's path, every chunk verified."""
        started = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self.running = True
        self.totals.active += 1
        try:
            self._resume()
            self._check_disk()
            if os.fstat(self._fd).st_size != self.plan.length:
                os.ftruncate(self._fd, self.plan.length)
            self.ready.set()
            self._log("sync_transfer_started", length=self.plan.length, mirrors=len(self.mirrors))
            self._check_window()
            await self._from_mirrors()
            if len(self._have) < self.plan.count:
                await self.client.subscribe(self.reply_topic, self._on_reply, qos=1)
                try:
                    await self._loop()
                finally:
                    await self._quiet_unsubscribe()
            # No fsync here: the store's install fsyncs the verified copy, and a resume re-hashes
            # every chunk of the partial file, so unsynced or torn chunks are simply fetched again.
        except BaseException as exc:
            self._log("sync_transfer_failed", error=str(exc) or type(exc).__name__)
            raise
        finally:
            self.running = False
            self.finished = True
            self.totals.active -= 1
            os.close(self._fd)
            self._fd = -1
        self.stats.seconds = time.monotonic() - started
        mib_s = self.stats.bytes_received / (1 << 20) / max(self.stats.seconds, 1e-6)
        self._log("sync_transfer_done", seconds=round(self.stats.seconds, 2), mib_per_s=round(mib_s, 1))
        return self.path

    def _check_window(self) -> None:
        """At a chunk boundary: stop (TransferError ``deferred_download_window``) when the box's
        download window is closed; the verified chunks stay for the resume."""
        try:
            self.gate.check_window()
        except DownloadWindowClosed as exc:
            self._log("sync_transfer_waiting", reason="window", opens_in_s=round(exc.opens_in_s))
            raise TransferError(str(exc), status=Status.DOWNLOAD_WINDOW.value) from None

    async def _from_mirrors(self) -> None:
        """Fetch what is missing from each mirror in turn, verified per chunk; a mirror that fails
        (down, slow, bad responses, :data:`MIRROR_MAX_BAD_CHUNKS` wrong chunks) is skipped, and
        whatever is still missing afterwards comes over MQTT."""
        if not self.mirrors or not self.plan.file or len(self._have) == self.plan.count:
            return
        ctx = self.mirror_ssl if self.mirror_ssl is not None else mirror.ssl_context(None)
        async with mirror.session(self.mirror_timeout_s, ctx) as http:
            for base in self.mirrors:
                missing = [i for i in range(self.plan.count) if i not in self._have]
                if not missing:
                    return
                url = mirror.target_url(base, self.plan.file)
                reader = mirror.MirrorReader(http, url, self.mirror_timeout_s)
                try:
                    await self._from_mirror(reader, missing)
                except mirror.MirrorFailed as exc:
                    self.stats.mirror_skipped.append((base, exc.reason))
                    self.totals.mirror_skipped[exc.reason] += 1
                    if self.on_mirror_skipped is not None:
                        self.on_mirror_skipped(base, exc.reason)
                    log.warning(
                        "sync_mirror_skipped",
                        blob=self.plan.sha256[:16],
                        mirror=base,
                        reason=exc.reason,
                        detail=exc.detail[:300],
                    )

    def _spans(self, missing: list[int]) -> Iterator[list[tuple[int, int, int]]]:
        """Runs of consecutive missing chunks, each at most one range request."""
        cap = self.plan.chunk_size if self.gate.bucket is not None else MIRROR_SPAN_BYTES
        run: list[tuple[int, int, int]] = []
        size = 0
        for index in missing:
            offset, length = self.plan.span(index)
            if run and (run[-1][0] + 1 != index or size + length > cap):
                yield run
                run, size = [], 0
            run.append((index, offset, length))
            size += length
        if run:
            yield run

    async def _from_mirror(self, reader: mirror.MirrorReader, missing: list[int]) -> None:
        bad = 0
        for run in self._spans(missing):
            self._check_window()
            await self.gate.take(sum(length for _i, _o, length in run))
            stream = reader.span(run)
            try:
                async for index, data in stream:
                    if not self.accept(index, data, reader.url):
                        bad += 1
                        if bad >= MIRROR_MAX_BAD_CHUNKS:
                            detail = f"{reader.url}: {bad} chunks of wrong bytes"
                            raise mirror.MirrorFailed("wrong_bytes", detail)
                    self._check_window()
            finally:
                await stream.aclose()

    async def _quiet_unsubscribe(self) -> None:
        with contextlib.suppress(MqttError):
            await self.client.unsubscribe(self.reply_topic, timeout=5)

    async def _loop(self) -> None:
        order = [i for i in range(self.plan.count) if i not in self._have]
        next_pos = 0
        while len(self._have) < self.plan.count:
            if self._failure is not None:
                raise self._failure
            if not self.client.is_connected:
                if self._inflight:  # replies to a lost session may never come: ask again
                    self._reasked("reconnect", len(self._inflight))
                    self._inflight.clear()
                await self.client.wait_connected(None)
                continue
            # A request expires when nothing has arrived for chunk_timeout_s since it was sent: on
            # a slow link a full window takes long, but chunks keep coming, so nothing is re-asked.
            now = time.monotonic()
            for index, sent in list(self._inflight.items()):
                if now - max(sent, self._last_progress) > self.chunk_timeout_s:
                    self._inflight.pop(index)
                    self._reasked("timeout")
                    self._check_attempts(index)
            if self._failure is not None:
                raise self._failure
            if not self.gate.window_open():
                # Pause at a chunk boundary: ask nothing new, let what is in flight land, then stop.
                if not self._inflight:
                    self._check_window()
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                continue
            retry = [
                i
                for i in order[:next_pos]
                if i not in self._have and i not in self._inflight and self._retry_at.get(i, 0.0) <= now
            ]
            try:
                for index in retry:
                    if len(self._inflight) >= self.window or not await self._admit(index):
                        break
                    await self._request(index)
                while len(self._inflight) < self.window and next_pos < len(order):
                    index = order[next_pos]
                    if index not in self._have:
                        if not await self._admit(index):
                            break
                        await self._request(index)
                    next_pos += 1
            except MqttError as exc:
                log.info("sync_request_failed", error=str(exc))
                await asyncio.sleep(0.2)
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    async def _admit(self, index: int) -> bool:
        """Whether chunk ``index`` may be asked now: inside the download window, after the rate
        limit admitted its bytes (the window is looked at again after that wait)."""
        if not self.gate.window_open():
            return False
        await self.gate.take(self.plan.span(index)[1])
        return self.gate.window_open()

    def _check_attempts(self, index: int) -> None:
        """Record the transfer's failure once a chunk was asked ``max_attempts`` times."""
        if self.stats.requested[index] < self.max_attempts or self._failure is not None:
            return
        status = Status.CHUNK_HASH_MISMATCH if self.stats.refused_chunks else Status.TIMEOUT
        if self._last_status is not None:
            status = Status(self._last_status) if self._last_status in set(Status) else Status.ERROR
        self._failure = TransferError(
            f"chunk {index} of {self.plan.sha256[:16]} did not arrive intact "
            f"after {self.max_attempts} requests",
            status=status.value,
        )

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_chunk(self, index: int, running: Future[Any], deadline: float) -> None:
        """Block (another thread) until chunk ``index`` is verified on disk; raise the transfer's
        error if it ended without it, TransferError(timeout) after ``deadline`` (monotonic)."""
        with self._cond:
            while index not in self._have:
                if running.done():
                    running.result()  # raises the transfer's error
                    if index not in self._have:
                        raise TransferError(f"chunk {index} never arrived", status=Status.ERROR.value)
                if time.monotonic() > deadline:
                    raise TransferError(f"chunk {index} not in time", status=Status.TIMEOUT.value)
                self._cond.wait(0.5)

    def discard(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# --- the fetcher -----------------------------------------------------------------------------


class MqttFetcher(RegistryFetcher):
    """python-tuf fetcher over MQTT. Called from a worker thread (``DeviceRegistry.update`` runs
    in an executor); each fetch runs its coroutine on the agent's event loop and waits for it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: MqttClient,
        device_id: str,
        metadata: RetainedMetadata,
        plans: Callable[[str], ChunkPlan],
        partial_dir: Path,
        *,
        window: int = 4,
        chunk_timeout_s: float = 30.0,
        transfer_timeout_s: float = 3600.0,
        on_refusal: RefusalSink = _no_refusal_sink,
        on_progress: Callable[[str, int, int], None] | None = None,
        mirrors: Callable[[], Sequence[str]] | Sequence[str] = (),
        gate: TransferGate | None = None,
        mirror_timeout_s: float = 10.0,
        mirror_ca_file: Path | None = None,
    ) -> None:
        """``mirrors``: base URLs, or a callable read at each transfer's start (the service joins
        ``[hub] mirrors`` and the signed deployments' mirrors); ``gate``: the box's download
        window and rate limit, shared by every transfer of this fetcher."""
        self.mirrors = mirrors
        self.gate = gate if gate is not None else TransferGate()
        self.mirror_timeout_s = mirror_timeout_s
        self.mirror_ssl = mirror.ssl_context(mirror_ca_file)
        self.loop = loop
        self.client = client
        self.device_id = device_id
        self.metadata = metadata
        self.plans = plans
        self.partial_dir = partial_dir
        self.window = window
        self.chunk_timeout_s = chunk_timeout_s
        self.transfer_timeout_s = transfer_timeout_s
        self.on_refusal = on_refusal
        self.on_progress = on_progress
        self.transfers: list[TransferStats] = []
        self.totals = TransferTotals(gate=self.gate)
        self._benched: dict[str, float] = {}
        """mirror -> monotonic time until which it is not asked (:data:`MIRROR_BENCH_S`)."""
        self._active: list[ChunkTransfer] = []

    def _run(self, coro: Any, timeout: float) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise TransferError("timed out", status=Status.TIMEOUT.value) from None

    def _fetch(self, url: str) -> Iterator[bytes]:
        if url.startswith(METADATA_BASE):
            name = url.removeprefix(METADATA_BASE)
            data = self._run(self.metadata.get(name), self.metadata.wait_s + 5)
            if data is None:
                raise DownloadHTTPError(f"{name} is not published by the hub", 404)
            return iter((data,))
        if not url.startswith(TARGETS_BASE):
            raise DownloadHTTPError(f"not a repository file: {url!r}", 404)
        file_name = url.rsplit("/", 1)[-1]
        sha = file_name.split(".", 1)[0]
        plan = self.plans(sha)
        label = url.removeprefix(TARGETS_BASE)

        def progress(have: int, total: int) -> None:
            if self.on_progress is not None:
                self.on_progress(label, have, total)

        return self._stream(self._transfer(plan, on_progress=progress))

    def _transfer(self, plan: ChunkPlan, **options: Any) -> ChunkTransfer:
        """A chunk transfer of ``plan`` with this fetcher's client, window, timeout and refusal sink."""
        transfer = ChunkTransfer(
            self.client,
            self.device_id,
            plan,
            self.partial_dir,
            window=self.window,
            chunk_timeout_s=self.chunk_timeout_s,
            on_refusal=self.on_refusal,
            totals=self.totals,
            mirrors=self.mirror_urls(),
            gate=self.gate,
            mirror_timeout_s=self.mirror_timeout_s,
            mirror_ssl=self.mirror_ssl,
            on_mirror_skipped=self._bench,
            **options,
        )
        self._active = [t for t in self._active if not t.finished]
        self._active.append(transfer)
        return transfer

    def mirror_urls(self) -> tuple[str, ...]:
        """The mirrors to ask now, in order, each once, without those skipped lately."""
        urls = self.mirrors() if callable(self.mirrors) else self.mirrors
        now = time.monotonic()
        return tuple(u for u in dict.fromkeys(urls) if self._benched.get(u, 0.0) <= now)

    def _bench(self, url: str, reason: str) -> None:
        self._benched[url] = time.monotonic() + MIRROR_BENCH_S

    def timeout_for(self, plan: ChunkPlan) -> float:
        """``transfer_timeout_s``, plus the time the rate limit alone needs for the blob."""
        rate = self.gate.rate
        return self.transfer_timeout_s + (plan.length / rate if rate else 0.0)

    def hub_back(self) -> int:
        """On the event loop: the hub announced itself; running transfers ask again what is in
        flight (:meth:`ChunkTransfer.reask_now`). Returns the number of requests asked again."""
        return sum(t.reask_now() for t in self._active if t.running)

    def adopt(self, sha256: str, length: int) -> Path:
        """Fetch blob ``sha256`` into its partial file and return it, every chunk verified (for
        :class:`AdoptingStore`, which checks the whole file and renames it into the store)."""
        plan = self.plans(sha256)
        if plan.length != length:
            raise TransferError(
                f"{sha256[:16]}: plan says {plan.length} bytes, target {length}", status="bad_request"
            )
        transfer = self._transfer(plan, adopted=True)
        path: Path = self._run(transfer.run(), self.timeout_for(plan))
        self.transfers.append(transfer.stats)
        return path

    def _stream(self, transfer: ChunkTransfer) -> Iterator[bytes]:
        """Yield the blob's chunks in order *while* the transfer runs on the loop, so the store
        hashes and writes its copy as the bytes arrive; each chunk is yielded only once verified
        and on disk in the partial file. The partial file is removed once everything was yielded
        (the store then installs or refuses the whole); if the consumer stops early (disk full,
        shutdown) the transfer is cancelled and the partial file kept for a resume."""
        running: Future[Any] = asyncio.run_coroutine_threadsafe(transfer.run(), self.loop)
        deadline = time.monotonic() + self.timeout_for(transfer.plan)
        plan = transfer.plan
        complete = False
        fd = -1
        try:
            while not transfer.ready.wait(0.2):
                if running.done():
                    running.result()
                if time.monotonic() > deadline:
                    raise TransferError("transfer did not start", status=Status.TIMEOUT.value)
            fd = os.open(transfer.path, os.O_RDONLY)
            for index in range(plan.count):
                transfer.wait_chunk(index, running, deadline)
                offset, length = plan.span(index)
                yield os.pread(fd, length, offset)
            running.result(max(1.0, deadline - time.monotonic()))
            self.transfers.append(transfer.stats)
            complete = True
        finally:
            if fd >= 0:
                os.close(fd)
            if complete:
                transfer.discard()
            else:
                running.cancel()


class AdoptingStore(BlobStore):
    """The registry's blob store, installing MQTT transfers by renaming their partial file.

    :class:`~registry.store.BlobStore` copies the bytes a fetcher yields into a temp file; for a
    blob the MQTT fetcher has already written (to resume after a restart) that is a second full
    write. This store keeps the store's invariant — a file under its final name has exactly the
    bytes of its sha256, fsynced before the rename, the directory fsynced after — but gets there
    by verifying the partial file as a whole, fsyncing it, making it read-only and renaming it.
    Attach it with :func:`attach`.
    """

    def __init__(self, root: Path, adopt: Callable[[str, int], Path]) -> None:
        super().__init__(root)
        self._adopt = adopt

    def install(self, blocks: Iterable[bytes], *, name: str, length: int, sha256: str) -> Path:
        final = self.path(sha256)
        if self.has(sha256, length):
            return final
        close = getattr(blocks, "close", None)
        if close is not None:
            close()  # the generic path (a fetcher generator) is not used
        part = self._adopt(sha256, length)
        verifier = BlobVerifier(name, length, sha256)
        try:
            with part.open("r+b", buffering=0) as fh:
                buf = bytearray(1 << 20)
                view = memoryview(buf)
                while n := fh.readinto(buf):
                    verifier.update(view[:n])
                verifier.finish()
                os.fsync(fh.fileno())
            os.chmod(part, 0o444)
            self.dir.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)
            fsync_dir(self.dir)
        except Refused:
            part.unlink(missing_ok=True)  # whole-file mismatch: never resume from these bytes
            raise
        except OSError as exc:
            raise translate_os_error(exc, f"cannot install {name}") from None
        return final


def attach(registry: DeviceRegistry, fetcher: MqttFetcher) -> None:
    """Make ``registry`` install ``fetcher``'s transfers by renaming them (see AdoptingStore)."""
    registry.store = AdoptingStore(registry.store.root, fetcher.adopt)


__all__ = [
    "TransferTotals",
    "AdoptingStore",
    "ChunkPlan",
    "ChunkTransfer",
    "MqttFetcher",
    "RetainedMetadata",
    "TransferStats",
    "attach",
    "plan_from_target",
    "trusted_plans",
]
