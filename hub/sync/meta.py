"""Hub side of metadata distribution: the repository's TUF metadata, retained, on MQTT.

What is published (all retained, QoS 1) under ``edge/v1/repo/meta/``:
every ``<N>.root.json`` (a device walks the root chain one version at a time), the current
``<N>.targets.json`` and ``<N>.snapshot.json``, ``index.json`` naming them, then
``timestamp.json``. Files that are no longer current (older snapshots and targets) are cleared with an empty
retained message, so the broker holds one consistent set plus the root history.

Invariants: a file is republished only when its bytes changed; ``timestamp.json`` goes out last,
after the snapshot and targets it names and after the index that lists them, so a device that
sees a new timestamp finds what it points to; files no longer current are cleared only after it.
Nothing here signs: :class:`registry.repository.Repository` does, and
:func:`refresh_timestamp` only opens the repository and asks it to re-sign the timestamp.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator
from pathlib import Path

from fleet.log import get_logger
from fleet.messages import META_INDEX, MetaIndex, Outgoing, meta_topic
from fleet.mqtt import MqttClient

log = get_logger(__name__)
_VERSIONED = re.compile(r"(\d+)\.(root|snapshot|targets)\.json")


def current_files(metadata_dir: Path) -> dict[str, Path]:
    """The metadata a device needs: every root version, the newest snapshot/targets, timestamp."""
    newest: dict[str, int] = {}
    roots: dict[str, Path] = {}
    for path in metadata_dir.iterdir() if metadata_dir.is_dir() else ():
        m = _VERSIONED.fullmatch(path.name)
        if not m:
            continue
        version, role = int(m.group(1)), m.group(2)
        if role == "root":
            roots[path.name] = path
        else:
            newest[role] = max(newest.get(role, 0), version)
    files = dict(sorted(roots.items(), key=lambda kv: int(kv[0].split(".")[0])))
    for role in ("targets", "snapshot"):
        if role in newest:
            files[f"{newest[role]}.{role}.json"] = metadata_dir / f"{newest[role]}.{role}.json"
    if (metadata_dir / "timestamp.json").is_file():
        files["timestamp.json"] = metadata_dir / "timestamp.json"
    return files


@contextlib.contextmanager
def repo_lock(repo_dir: Path) -> Iterator[None]:
    """One writer of the repository at a time (``edge-hub serve``'s timestamp job, CLI pushes)."""
    fd = os.open(repo_dir / ".sync.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class MetaPublisher:
    """Keeps the broker's retained metadata equal to the repository's current metadata."""

    def __init__(self, client: MqttClient, repo_dir: Path) -> None:
        self.client = client
        self.repo_dir = repo_dir
        self.published: dict[str, bytes] = {}

    async def sync(self, *, force: bool = False) -> list[str]:
        """Publish what changed; returns the names published (cleared files are not listed)."""
        with repo_lock(self.repo_dir):
            files = {
                name: path.read_bytes() for name, path in current_files(self.repo_dir / "metadata").items()
            }
        changed = [n for n, data in files.items() if force or self.published.get(n) != data]
        order = sorted(changed, key=lambda n: (n == "timestamp.json", n))
        stale = [n for n in self.published if n not in files]
        for name in order:
            if name == "timestamp.json" and (changed or stale or force):
                # The index goes out before the timestamp that makes devices look for the new files.
                await self.client.publish(
                    Outgoing(meta_topic(META_INDEX), MetaIndex(tuple(files)).encode(), qos=1, retain=True)
                )
            await self.client.publish(Outgoing(meta_topic(name), files[name], qos=1, retain=True))
            self.published[name] = files[name]
        if "timestamp.json" not in order and (stale or force):
            await self.client.publish(
                Outgoing(meta_topic(META_INDEX), MetaIndex(tuple(files)).encode(), qos=1, retain=True)
            )
        for name in stale:
            await self.client.publish(Outgoing(meta_topic(name), b"", qos=1, retain=True))
            del self.published[name]
        if changed:
            log.info("meta_published", files=order)
        return order


def refresh_timestamp(repo_dir: Path, passphrase: bytes | None = None) -> int:
    """Re-sign the repository's timestamp (scheduled job); returns the new timestamp version."""
    from registry.repository import Repository

    with repo_lock(repo_dir):
        repo = Repository.open(repo_dir, passphrase)
        repo.refresh_timestamp()
        return int(repo.timestamp.signed.version)


__all__ = ["MetaPublisher", "current_files", "refresh_timestamp", "repo_lock"]
