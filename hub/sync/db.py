"""The hub database behind one small interface: SQLite (a file, the embedded default) or
PostgreSQL (``postgresql://...``, several hub workers on several hosts).

Chosen by one setting, ``EDGE_HUB_DB`` / ``--db``: a URL starting with ``postgresql://`` (or
``postgres://``) opens PostgreSQL through a psycopg 3 connection pool, anything else is the path of
a SQLite file. The store's SQL is written once, with ``?`` placeholders and only syntax both engines
accept (``INSERT ... ON CONFLICT DO NOTHING``, upserts with ``excluded``); the PostgreSQL side turns
``?`` into ``%s`` (no statement of the store contains a literal ``?`` or ``%``).

Invariants:
- :meth:`Database.tx` is one transaction: committed when the block ends normally (an early
  ``return`` included), rolled back on an exception. SQLite takes the write lock at the start
  (``BEGIN IMMEDIATE``: writers are serialised); PostgreSQL runs at READ COMMITTED and the store
  takes row locks where it reads before it writes (:attr:`Database.for_update`, e.g. the device row
  before extending its audit chain), so concurrent writers never lose an update.
- :meth:`Database.query` reads outside any write transaction and returns all rows (no cursor
  outlives the call, so a pooled connection goes back at once).
- The schema is brought to :data:`hub.sync.migrations.LATEST` when the database is opened
  (:func:`hub.sync.migrations.open_database`).
- A failure that says the database cannot be reached or used *right now* (PostgreSQL restarting or
  unreachable, a pool with no connection to give, SQLite locked or busy past its timeout, its disk
  full) is raised as :class:`DatabaseUnavailable` from :meth:`Database.tx` and
  :meth:`Database.query`, the transaction rolled back: the caller may try again later. Every other
  error (a bug, a constraint) keeps its own type.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

PG_SCHEMES = ("postgresql://", "postgres://")


class DatabaseUnavailable(Exception):
    """The database cannot be used now (module docstring); nothing of the transaction was kept."""


_SQLITE_TRANSIENT = ("locked", "busy", "disk i/o", "unable to open", "disk is full")


def _sqlite_unavailable(exc: sqlite3.OperationalError) -> bool:
    text = str(exc).lower()
    return any(t in text for t in _SQLITE_TRANSIENT)


class Cursor(Protocol):
    """What a statement returns inside a transaction (sqlite3 and psycopg cursors both are)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx(Protocol):
    """A connection inside a transaction."""

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any: ...


def is_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(PG_SCHEMES)


def describe(target: str | Path) -> str:
    """``target`` for messages and logs: a URL without its password."""
    if not is_url(target):
        return str(target)
    import re

    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", str(target))


class Database(ABC):
    dialect: str
    for_update: str
    """`` FOR UPDATE`` where the engine has row locks (PostgreSQL), else empty (SQLite's write
    transaction already excludes other writers)."""

    @abstractmethod
    def tx(self) -> contextlib.AbstractContextManager[Tx]: ...

    @abstractmethod
    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def one(self, sql: str, args: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    @abstractmethod
    def lock_table(self, tx: Tx, table: str) -> None:
        """Exclude other writers of ``table`` until ``tx`` ends (ids allocated as ``MAX + 1``)."""

    @abstractmethod
    def insert_rows(self, tx: Tx, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """Insert ``rows`` that the caller knows are new (under the lock that makes them so): a
        duplicate key is an error that rolls ``tx`` back, never skipped. PostgreSQL: one ``COPY``."""

    @abstractmethod
    def close(self) -> None: ...


class SqliteDatabase(Database):
    """One SQLite file, safe to share between the processes of one host (WAL, busy timeout);
    one connection per thread."""

    dialect = "sqlite"
    for_update = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()

    def conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def tx(self) -> Iterator[Tx]:
        try:
            conn = self.conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn  # sqlite3.Connection is a Tx
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if _sqlite_unavailable(exc):
                raise DatabaseUnavailable(f"{self.path}: {exc}") from exc
            raise

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return [tuple(r) for r in self.conn().execute(sql, args).fetchall()]
        except sqlite3.OperationalError as exc:
            if _sqlite_unavailable(exc):
                raise DatabaseUnavailable(f"{self.path}: {exc}") from exc
            raise

    def lock_table(self, tx: Tx, table: str) -> None:
        pass  # BEGIN IMMEDIATE holds the database's write lock

    def insert_rows(self, tx: Tx, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        assert table.isidentifier() and all(c.isidentifier() for c in columns)
        marks = ", ".join("?" for _ in columns)
        tx.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)  # noqa: S608

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _pg(sql: str) -> str:
    assert "%" not in sql, "the store's SQL has no literal %"
    return sql.replace("?", "%s")


class _PgTx:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        cur: Cursor = self.conn.execute(_pg(sql), tuple(args))
        return cur

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        with self.conn.cursor() as cur:
            cur.executemany(_pg(sql), [tuple(r) for r in rows])


class PostgresDatabase(Database):
    """A psycopg 3 connection pool (``min_size`` .. ``max_size`` connections, autocommit outside
    :meth:`tx`). The password belongs in ``~/.pgpass`` / ``PGPASSFILE`` or ``PGPASSWORD``, not the
    URL (which appears in process listings)."""

    dialect = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(
        self, url: str, min_size: int = 1, max_size: int = 8, acquire_timeout_s: float = 5.0
    ) -> None:
        """``acquire_timeout_s``: how long :meth:`tx` / :meth:`query` wait for a pooled connection
        (while PostgreSQL is unreachable the pool has none) before :class:`DatabaseUnavailable`;
        shorter than a device's 30 s audit ack timeout, so the hub can answer ``retry`` first."""
        from psycopg_pool import ConnectionPool

        self.url = url
        self.pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            kwargs={"autocommit": True},
            timeout=acquire_timeout_s,
            open=False,
            name="edge-hub",
        )
        self.pool.open(wait=True, timeout=30.0)

    @contextlib.contextmanager
    def tx(self) -> Iterator[Tx]:
        with _pg_unavailable(self.url), self.pool.connection() as conn, conn.transaction():
            yield _PgTx(conn)

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with _pg_unavailable(self.url), self.pool.connection() as conn:
            return [tuple(r) for r in conn.execute(_pg(sql), tuple(args)).fetchall()]

    def lock_table(self, tx: Tx, table: str) -> None:
        assert table.isidentifier()
        tx.execute(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE")

    def insert_rows(self, tx: Tx, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        assert isinstance(tx, _PgTx)
        assert table.isidentifier() and all(c.isidentifier() for c in columns)
        with tx.conn.cursor() as cur, cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)

    def close(self) -> None:
        self.pool.close()


@contextlib.contextmanager
def _pg_unavailable(url: str) -> Iterator[None]:
    """psycopg's ``OperationalError`` (connection lost or refused, server shutting down,
    serialization failure, deadlock) and the pool's timeout become :class:`DatabaseUnavailable`."""
    import psycopg
    from psycopg_pool import PoolTimeout

    try:
        yield
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise DatabaseUnavailable(f"{describe(url)}: {type(exc).__name__}: {exc}") from exc


def db_target(value: str | Path | None) -> str | Path:
    """The database an ``edge-hub`` command uses: ``--db``, else ``$EDGE_HUB_DB``, else ``./hub.db``;
    a ``postgresql://`` URL stays a string, anything else is a path."""
    import os

    raw = str(value) if value is not None else os.environ.get("EDGE_HUB_DB", "hub.db")
    return raw if is_url(raw) else Path(raw)


def exists(target: str | Path) -> bool:
    """Whether ``target`` is there to read (a PostgreSQL URL is taken to be: connecting says)."""
    return is_url(target) or Path(target).is_file()


__all__ = [
    "PG_SCHEMES",
    "Cursor",
    "Database",
    "DatabaseUnavailable",
    "PostgresDatabase",
    "SqliteDatabase",
    "Tx",
    "db_target",
    "describe",
    "exists",
    "is_url",
]
