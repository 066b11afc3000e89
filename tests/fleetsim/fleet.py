"""A simulated fleet and a real ``edge-hub serve`` process for it.

:class:`SimFleet` starts N :class:`~tests.fleetsim.box.SimBox` in the running loop (each its own
MQTT connection and certificate, :mod:`tests.fleetsim.pki`), registers their audit keys in the
hub database (what ``edge-hub device register`` does) and offers the waits the test and the
benchmark need. :class:`HubProcess` runs ``python -m hub.cli serve`` from this checkout against
the broker's service listener.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.mqtt import MqttConfig
from hub.sync.db import exists as db_exists
from hub.sync.store import HubStore
from tests.fleetsim.box import Behaviour, SimBox
from tests.fleetsim.verify import MetaVerifier

REPO = Path(__file__).resolve().parents[2]


def sim_hardware() -> dict[str, Any]:
    """What a box reports: this machine's probe (as the daemon sends it), probed once."""
    global _HARDWARE
    if _HARDWARE is None:
        from agent.hardware.probe import probe

        _HARDWARE = probe(timeout_s=1.0).to_dict()
    return dict(_HARDWARE)


_HARDWARE: dict[str, Any] | None = None


@dataclass
class HubProcess:
    """``edge-hub serve`` (role all) as its own process, logging to ``work/hub.log``."""

    repo: Path
    db: Path | str
    """a SQLite path, or a ``postgresql://`` URL (its schema is made by whoever opens it first)"""
    work: Path
    host: str
    port: int
    pki: Path
    rollout_interval_s: float = 1.0
    client_id: str = "hub-sim"
    proc: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "hub.cli", "serve",
            "--repo", str(self.repo), "--db", str(self.db),
            "--host", self.host, "--port", str(self.port),
            "--ca", str(self.pki / "ca.crt"), "--cert", str(self.pki / "hub.crt"),
            "--key", str(self.pki / "hub.key"), "--client-id", self.client_id,
            "--rollout-interval", str(self.rollout_interval_s), "--backoff-max", "2",
            *self.extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        log = (self.work / "hub.log").open("ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=log, cwd=self.work)
        log.close()
        deadline = time.monotonic() + 30
        while not db_exists(self.db):
            if self.proc.poll() is not None:
                raise RuntimeError(f"edge-hub serve exited: {(self.work / 'hub.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("edge-hub serve made no database")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(40)  # it leaves first: up to --leave-timeout (20 s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


class SimFleet:
    """N simulated boxes sharing one metadata verifier."""

    def __init__(
        self,
        ids: Iterable[str],
        config_of: Callable[[str], MqttConfig],
        trusted_root: bytes,
        *,
        groups: tuple[str, ...] = ("edge",),
        behaviour: Callable[[str], Behaviour] | None = None,
        hardware: dict[str, Any] | None = None,
        client_factory: Callable[[MqttConfig], Any] | None = None,
    ) -> None:
        self.verifier = MetaVerifier(trusted_root)
        hw = sim_hardware() if hardware is None else hardware
        self.boxes = [
            SimBox(
                d,
                config_of(d),
                self.verifier,
                groups=groups,
                hardware=hw,
                behaviour=behaviour(d) if behaviour else None,
                client_factory=client_factory,
            )
            for d in ids
        ]
        self.by_id = {b.id: b for b in self.boxes}

    def register_keys(self, db: Path | str) -> None:
        """Each box's audit key in the hub database, as ``edge-hub device register`` does."""
        store = HubStore(db)
        try:
            for b in self.boxes:
                store.register_key(b.id, b.key_hex)
        finally:
            store.close()

    async def start(self, *, timeout: float = 120.0) -> float:
        """Start every box at once (the connect storm); seconds until all are connected."""
        t0 = time.monotonic()
        await asyncio.gather(*(b.start() for b in self.boxes))
        await asyncio.gather(*(b.wait_connected(timeout) for b in self.boxes))
        return time.monotonic() - t0

    async def close(self) -> None:
        await asyncio.gather(*(b.close() for b in self.boxes), return_exceptions=True)

    async def wait(self, predicate: Callable[[SimBox], bool], timeout: float, what: str) -> float:
        """Seconds until ``predicate`` holds for every box; AssertionError naming ``what`` and the
        boxes still waiting after ``timeout``."""
        t0 = time.monotonic()
        while True:
            waiting = [b.id for b in self.boxes if not predicate(b)]
            if not waiting:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"timed out waiting for {what}: {len(waiting)} boxes, e.g. {waiting[:5]}"
                )
            await asyncio.sleep(0.05)


async def wait_store(
    db: Path | str,
    predicate: Callable[[HubStore], bool],
    timeout: float,
    what: str,
    poll_s: float = 0.2,
) -> float:
    """Seconds until ``predicate(store)`` holds on the hub's database (read by a store of our own)."""
    store = HubStore(db)
    t0 = time.monotonic()
    try:
        while not await asyncio.to_thread(predicate, store):
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(poll_s)
        return time.monotonic() - t0
    finally:
        store.close()


__all__ = ["HubProcess", "SimFleet", "sim_hardware", "wait_store"]
