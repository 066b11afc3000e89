"""The device's sync ledger: one SQLite file, ``<state_dir>/sync/ledger.db``.

It holds what fleet sync must not forget across a restart: the event outbox
(:mod:`agent.sync.outbox`), the failed activations and their retry schedule, and the time since
which an installed model is no longer deployed (the removal grace period).

Invariants: every write is one transaction committed with ``synchronous=FULL`` in WAL mode, so a
``kill -9`` or a power cut at any point leaves every committed row intact and no half-written row
visible; any SQLite or OS failure is raised as :class:`~agent.sync.errors.LedgerError`.

Threads: one connection shared by any thread (the service runs the fsyncing outbox writes in a
worker thread, off the event loop); one lock serializes every transaction and query, so a
transaction never interleaves with another thread's statements. Each operation is a few small
statements.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.sync.errors import LedgerError

LEDGER_FILE = "ledger.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failures (
    model TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    failed_at REAL NOT NULL,
    next_at REAL NOT NULL,
    error TEXT NOT NULL,
    basis TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS unneeded (
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    since REAL NOT NULL,
    PRIMARY KEY (model, version)
) WITHOUT ROWID;
"""


class Ledger:
    """The open ledger. ``Ledger.open(state_dir)``; ``close()`` when done."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self.lock = threading.RLock()

    @classmethod
    def open(cls, state_dir: Path) -> Ledger:
        path = state_dir / "sync" / LEDGER_FILE
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            conn = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise LedgerError(f"cannot open the sync ledger {path}: {exc}") from None
        return cls(conn, path)

    def close(self) -> None:
        with self.lock, contextlib.suppress(sqlite3.Error):
            self.conn.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``), rolled back on error.

        Any SQLite failure, in the body or at ``COMMIT`` (a full disk), is raised as
        :class:`LedgerError` after a rollback; the rollback runs only while a transaction is still
        open (after ``SQLITE_FULL`` SQLite has often rolled back already) and its own failure is
        suppressed, so the connection is left with no transaction open and usable again.
        """
        with self.lock:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise LedgerError(f"sync ledger {self.path}: {exc}") from None
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                raise LedgerError(f"sync ledger {self.path}: {exc}") from None
            except BaseException:
                self._rollback()
                raise

    def _rollback(self) -> None:
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")

    def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self.lock:
            try:
                return list(self.conn.execute(sql, args))
            except sqlite3.Error as exc:
                raise LedgerError(f"sync ledger {self.path}: {exc}") from None

    def counter(self, name: str) -> int:
        rows = self.query("SELECT value FROM counters WHERE name = ?", (name,))
        return int(rows[0][0]) if rows else 0


@dataclass(frozen=True, slots=True)
class Failure:
    """A deployment whose activation failed: the retry schedule of (model, version)."""

    model: str
    version: str
    attempts: int
    failed_at: float
    next_at: float
    error: str
    basis: str
    """fingerprint of the deployments the failure happened under; a change resets the schedule"""

    def to_report(self) -> dict[str, object]:
        return {
            "model": self.model,
            "version": self.version,
            "attempts": self.attempts,
            "next_retry": round(self.next_at, 3),
            "error": self.error[:300],
        }


class FailureBook:
    """Failed activations, one row per model (the version that failed last)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def all(self) -> dict[str, Failure]:
        rows = self.ledger.query(
            "SELECT model, version, attempts, failed_at, next_at, error, basis FROM failures ORDER BY model"
        )
        out = {}
        for m, v, a, f, n, e, b in rows:
            out[str(m)] = Failure(str(m), str(v), int(a), float(f), float(n), str(e), str(b))
        return out

    def put(self, failure: Failure) -> None:
        with self.ledger.tx() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO failures (model, version, attempts, failed_at, next_at, error, basis)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    failure.model,
                    failure.version,
                    failure.attempts,
                    failure.failed_at,
                    failure.next_at,
                    failure.error,
                    failure.basis,
                ),
            )

    def clear(self, model: str) -> None:
        with self.ledger.tx() as conn:
            conn.execute("DELETE FROM failures WHERE model = ?", (model,))


class UnneededBook:
    """Since when each installed (model, version) has not been wanted (removal grace period)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def all(self) -> dict[tuple[str, str], float]:
        rows = self.ledger.query("SELECT model, version, since FROM unneeded")
        return {(str(m), str(v)): float(s) for m, v, s in rows}

    def replace(self, since: dict[tuple[str, str], float]) -> None:
        """Make the table exactly ``since`` (one transaction)."""
        with self.ledger.tx() as conn:
            conn.execute("DELETE FROM unneeded")
            conn.executemany(
                "INSERT INTO unneeded (model, version, since) VALUES (?, ?, ?)",
                [(m, v, s) for (m, v), s in since.items()],
            )


__all__ = ["LEDGER_FILE", "Failure", "FailureBook", "Ledger", "UnneededBook"]
