"""Hub side of blob transfer: answer chunk requests from the repository's target files.

Any number of workers (threads of ``edge-hub serve`` or separate processes) subscribe to the
shared subscription ``$share/hub/edge/v1/repo/blobs/get``; the broker hands each request to one of
them. A worker is stateless: it maps the requested sha256 to the repository file
``targets/<dir>/<sha256>.<name>`` (content addressed, so any worker with the repository directory
answers the same bytes) and publishes the range to the request's response topic with the
request's correlation data.

Invariants:
- Replies go only to a topic of the form ``edge/v1/devices/<id>/blobs``; a request naming any
  other response topic is dropped (the hub may publish anywhere under ``edge/v1``: it must not be
  turned into a relay by a device).
- A reply carries the MQTT 5 user property ``status`` (:class:`~fleet.messages.Status`);
  for ``ok`` the payload is exactly the requested bytes, else a short UTF-8 explanation.
- The worker never trusts the request beyond picking bytes: the device verifies every chunk
  against the signed hashes.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fleet.errors import MqttError, ProtocolError
from fleet.log import get_logger
from fleet.messages import BLOB_REQUESTS, ChunkRequest, Incoming, Outgoing, Status, device_of, shared
from fleet.mqtt import MqttClient

log = get_logger(__name__)
_BLOB_NAME = re.compile(r"([0-9a-f]{64})\.")


class BlobIndex:
    """sha256 -> file, from the names of the repository's target files (rescanned on a miss)."""

    def __init__(self, targets_dir: Path, rescan_after_s: float = 0.25) -> None:
        self.targets_dir = targets_dir
        self.rescan_after_s = rescan_after_s
        self._paths: dict[str, Path] = {}
        self._scanned = 0.0

    def scan(self) -> None:
        paths: dict[str, Path] = {}
        if self.targets_dir.is_dir():
            for path in self.targets_dir.rglob("*"):
                m = _BLOB_NAME.match(path.name)
                if m and path.is_file() and not path.is_symlink():
                    paths[m.group(1)] = path
        self._paths = paths
        self._scanned = time.monotonic()

    def get(self, sha256: str) -> Path | None:
        path = self._paths.get(sha256)
        if path is None and time.monotonic() - self._scanned > self.rescan_after_s:
            self.scan()
            path = self._paths.get(sha256)
        return path


@dataclass
class ServedStats:
    chunks: int = 0
    bytes: int = 0
    refused: int = 0


class BlobServer:
    """Answers chunk requests on the shared subscription."""

    def __init__(self, client: MqttClient, index: BlobIndex, *, share_group: str = "hub") -> None:
        self.client = client
        self.index = index
        self.share_group = share_group
        self.stats = ServedStats()
        self._fds: dict[Path, int] = {}

    async def start(self) -> None:
        self.index.scan()
        await self.client.subscribe(shared(BLOB_REQUESTS, self.share_group), self._on_request, qos=1)

    def close(self) -> None:
        log.info(
            "blob_worker_stats", chunks=self.stats.chunks, bytes=self.stats.bytes, refused=self.stats.refused
        )
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _read(self, path: Path, offset: int, length: int) -> bytes:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
        return os.pread(fd, length, offset)

    async def _on_request(self, msg: Incoming) -> None:
        reply_to = msg.response_topic
        try:
            if reply_to is None or device_of(reply_to)[1] != "blobs":
                raise ProtocolError(f"bad response topic {reply_to!r}")
        except ProtocolError as exc:
            self.stats.refused += 1
            log.warning("blob_request_dropped", error=str(exc))
            return
        try:
            req = ChunkRequest.decode(msg.payload)
        except ProtocolError as exc:
            await self._reply(reply_to, msg.correlation, Status.BAD_REQUEST, str(exc).encode())
            return
        if msg.correlation != req.correlation:
            await self._reply(reply_to, msg.correlation, Status.BAD_REQUEST, b"correlation mismatch")
            return
        path = self.index.get(req.sha256)
        if path is None:
            await self._reply(reply_to, msg.correlation, Status.NOT_FOUND, b"no such blob")
            return
        try:
            data = self._read(path, req.offset, req.length)
        except OSError as exc:
            self._fds.pop(path, None)
            await self._reply(reply_to, msg.correlation, Status.NOT_FOUND, str(exc).encode()[:200])
            return
        if len(data) != req.length:
            await self._reply(reply_to, msg.correlation, Status.BAD_REQUEST, b"range beyond the blob")
            return
        await self._reply(reply_to, msg.correlation, Status.OK, data)
        self.stats.chunks += 1
        self.stats.bytes += len(data)

    async def _reply(self, topic: str, correlation: bytes | None, status: Status, payload: bytes) -> None:
        try:
            await self.client.publish(
                Outgoing(topic, payload, qos=1, correlation=correlation, user=(("status", status.value),))
            )
        except MqttError as exc:
            log.info("blob_reply_failed", topic=topic, error=str(exc))


__all__ = ["BlobIndex", "BlobServer", "ServedStats"]
