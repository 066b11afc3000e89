"""Client certificates for a simulated fleet, issued once by :mod:`hub.sync.certs` and cached.

Issuing a certificate rewrites the PKI's ``issued.json``, so thousands of them take minutes; the
cache keeps one PKI directory (both CAs, the broker, ``hub``, ``operator`` and every device issued
so far) under ``~/.cache/edge-agent/fleetsim/pki-<prefix>`` and only issues the devices it lacks.
A run copies nothing: the broker and the clients read the cached files (keys 0600, as issued).
"""

from __future__ import annotations

import os
from pathlib import Path

from hub.sync.certs import issue, make_pki

SERVICE = ("hub", "operator")


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "edge-agent" / "fleetsim"


def device_ids(n: int, prefix: str = "sim") -> list[str]:
    """``sim-00000`` ... : fixed width, so ids sort in creation order."""
    return [f"{prefix}-{i:05d}" for i in range(n)]


def fleet_pki(n: int, prefix: str = "sim", root: Path | None = None) -> Path:
    """A PKI directory holding certificates for ``hub``, ``operator`` and ``device_ids(n, prefix)``."""
    d = (root or cache_root()) / f"pki-{prefix}"
    if not (d / "ca.crt").is_file() or not (d / "broker.crt").is_file():
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        make_pki(d, SERVICE)
    for cn in device_ids(n, prefix):
        if not (d / f"{cn}.crt").is_file() or not (d / f"{cn}.key").is_file():
            issue(d, cn)
    return d


__all__ = ["cache_root", "device_ids", "fleet_pki"]
