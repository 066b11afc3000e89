"""Checking the retained TUF metadata a simulated box receives, with python-tuf's own signature
checks, once per distinct set of files for the whole simulated fleet (every box receives the same
bytes; verifying them a thousand times would measure the simulator, not the hub).

:meth:`MetaVerifier.targets` walks the root chain from the enrolled root one version at a time
(each new root signed by the old one's threshold and its own), then checks timestamp, snapshot
and targets against the newest root, their expiry, and that the timestamp names the snapshot's
version and the snapshot the targets' version. Any failure raises :class:`MetaRefused`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

_VERSIONED = re.compile(r"(\d+)\.(root|snapshot|targets)\.json")


class MetaRefused(Exception):
    """The metadata did not verify (the reason is the message)."""


class MetaVerifier:
    """Shared by all boxes enrolled with the same root; caches verdicts by content hash."""

    def __init__(self, trusted_root: bytes) -> None:
        self.trusted_root = trusted_root
        self._cache: dict[str, Metadata[Targets]] = {}
        self.verified = 0
        """How many distinct metadata sets were checked (not cache hits)."""

    def targets(self, files: Mapping[str, bytes], names: list[str]) -> Metadata[Targets]:
        """The verified targets of the newest metadata among ``names`` (the hub's index)."""
        newest: dict[str, int] = {}
        for name in names:
            m = _VERSIONED.fullmatch(name)
            if m:
                newest[m.group(2)] = max(newest.get(m.group(2), 0), int(m.group(1)))
        need = [f"{newest.get(r, 0)}.{r}.json" for r in ("snapshot", "targets")] + ["timestamp.json"]
        roots = [f"{v}.root.json" for v in range(2, newest.get("root", 1) + 1)]
        missing = [n for n in need + roots if n not in files]
        if missing:
            raise MetaRefused(f"not received yet: {', '.join(missing)}")
        digest = hashlib.sha256()
        for n in roots + need:
            digest.update(n.encode() + b"\0" + hashlib.sha256(files[n]).digest())
        key = digest.hexdigest()
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        try:
            checked = self._check(files, roots, need)
        except MetaRefused:
            raise
        except Exception as exc:  # python-tuf's own errors (bad signature, threshold, format)
            raise MetaRefused(f"{type(exc).__name__}: {exc}") from None
        self._cache[key] = checked
        self.verified += 1
        return checked

    def _check(self, files: Mapping[str, bytes], roots: list[str], need: list[str]) -> Metadata[Targets]:
        root: Metadata[Root] = Metadata[Root].from_bytes(self.trusted_root)
        for name in roots:
            new: Metadata[Root] = Metadata[Root].from_bytes(files[name])
            root.verify_delegate(Root.type, new)
            new.verify_delegate(Root.type, new)
            if new.signed.version != root.signed.version + 1:
                raise MetaRefused(f"{name}: root version {new.signed.version} out of order")
            root = new
        snap_name, targets_name, ts_name = need
        ts: Metadata[Timestamp] = Metadata[Timestamp].from_bytes(files[ts_name])
        snap: Metadata[Snapshot] = Metadata[Snapshot].from_bytes(files[snap_name])
        tgt: Metadata[Targets] = Metadata[Targets].from_bytes(files[targets_name])
        for role, md in ((Timestamp.type, ts), (Snapshot.type, snap), (Targets.type, tgt)):
            root.verify_delegate(role, md)
            signed: Any = md.signed
            if signed.is_expired():
                raise MetaRefused(f"{role} expired")
        if ts.signed.snapshot_meta.version != snap.signed.version:
            raise MetaRefused("timestamp names another snapshot version")
        meta = snap.signed.meta.get("targets.json")
        if meta is None or meta.version != tgt.signed.version:
            raise MetaRefused("snapshot names another targets version")
        return tgt


__all__ = ["MetaRefused", "MetaVerifier"]
