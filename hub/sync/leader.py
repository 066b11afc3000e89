"""Which of several ``edge-hub serve`` workers does the jobs only one may do at a time (sign rollout
waves, re-sign the timestamp, publish the retained metadata, announce the hub's presence).

- PostgreSQL: a session-level advisory lock (:data:`LEADER_LOCK`) held on a connection of its own.
  The server releases it the moment that connection ends, so a worker killed at any point (kill -9,
  host lost: once TCP keepalive notices) hands the role on; a worker that loses its connection
  stops acting as leader at its next check (:meth:`Leadership.held`) before another can take over.
- SQLite: an exclusive ``flock`` on ``<db>.leader`` next to the file: one leader among the workers
  of one host (SQLite itself is one host only), released by the kernel when the process dies.

Invariant: :meth:`Leadership.held` is true in at most one worker per database at a time (up to the
moment a dead PostgreSQL connection is noticed by its holder, which then answers false).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any

from fleet.log import get_logger
from hub.sync.db import Database, PostgresDatabase, SqliteDatabase

log = get_logger(__name__)

LEADER_LOCK = 0x6564_6765_6875_6202
"""pg_try_advisory_lock key of the hub leader (``edgehub`` + 2)."""


class Leadership:
    """Try to become the leader and keep checking; never blocks longer than a connect."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn: Any = None
        self._fd: int | None = None
        self.leading = False

    def held(self) -> bool:
        """Whether this worker leads now (taking the role when it is free)."""
        if isinstance(self.db, PostgresDatabase):
            leading = self._pg()
        elif isinstance(self.db, SqliteDatabase):
            leading = self._flock(self.db.path)
        else:  # pragma: no cover - the two engines above are all there is
            raise TypeError(f"no leadership for {type(self.db).__name__}")
        if leading != self.leading:
            log.info("hub_leader" if leading else "hub_leader_lost")
        self.leading = leading
        return leading

    def _pg(self) -> bool:
        import psycopg

        assert isinstance(self.db, PostgresDatabase)
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.db.url, autocommit=True, connect_timeout=10)
                self.leading = False
            if self.leading:
                self._conn.execute("SELECT 1")  # the lock lives as long as this session
                return True
            (got,) = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()
            return bool(got)
        except psycopg.Error as exc:
            log.warning("hub_leader_check_failed", error=str(exc))
            self._drop()
            return False

    def _flock(self, path: Path) -> bool:
        if self._fd is None:
            self._fd = os.open(f"{path}.leader", os.O_RDWR | os.O_CREAT, 0o600)
        if self.leading:
            return True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None

    def release(self) -> None:
        self._drop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.leading = False


__all__ = ["LEADER_LOCK", "Leadership"]
