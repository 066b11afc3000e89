"""The newest value per key, written in batches by one writer (the hub's device state reports).

A fleet's boxes all send their state after every connect: after a broker restart 10,000 reports
arrive within seconds, and one durable commit per report (~1.7 ms on PostgreSQL with fsync) made
the inventory the slowest ingest of the hub (docs/benchmarks.md). Only a device's newest report
matters, so reports are kept per device until the writer takes them all in one transaction.

Invariants:
- One write at a time (a single flusher task): a key's values reach the store in arrival order,
  and a newer value never is overwritten by an older one.
- A value put while a write is in progress waits for the next write, which starts as soon as that
  one ends: an idle writer adds no delay, a busy one batches (group commit).
- A write that finds the database unavailable is retried (every :data:`RETRY_S`) with what it held,
  except keys that got a newer value meanwhile; pending values are bounded by the number of keys.
  Any other failure is logged and its batch dropped (the devices send their state again after
  their next connect and on every change).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

from fleet.log import get_logger
from hub.sync.db import DatabaseUnavailable

log = get_logger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

RETRY_S = 1.0
"""Pause before writing again what found the database unavailable."""


class LatestWriter(Generic[K, V]):
    """``put(key, value)`` on the event loop; ``write(batch)`` runs in a thread, one call at a time."""

    def __init__(self, write: Callable[[Sequence[tuple[K, V]]], None], name: str) -> None:
        self._write = write
        self.name = name
        self._pending: dict[K, V] = {}
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.writes = 0
        """Batches written (each one transaction)."""
        self.values = 0
        """Values written."""

    def put(self, key: K, value: V) -> None:
        self._pending[key] = value
        self._idle.clear()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._pending:
                batch = list(self._pending.items())
                self._pending.clear()
                try:
                    await asyncio.to_thread(self._write, batch)
                except DatabaseUnavailable as exc:
                    log.warning("write_retry", writer=self.name, values=len(batch), error=str(exc)[:200])
                    for key, value in batch:
                        self._pending.setdefault(key, value)  # a newer value put meanwhile wins
                    await asyncio.sleep(RETRY_S)
                    continue
                except Exception as exc:
                    log.error("write_failed", writer=self.name, values=len(batch), error=repr(exc)[:300])
                    continue
                self.writes += 1
                self.values += len(batch)
        finally:
            self._task = None
            if not self._pending:
                self._idle.set()

    async def flushed(self) -> None:
        """Until every value put so far is written (or dropped after a failure)."""
        await self._idle.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


__all__ = ["RETRY_S", "LatestWriter"]
