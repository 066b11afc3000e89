"""The audit log on disk: SQLite in WAL mode, one writer thread, group commit, signed checkpoints.

Invariants:

- Append-only: the agent only ever INSERTs records, and DELETEs a prefix of records that were
  uploaded and acknowledged (``mark_uploaded``), remembering the last deleted one as the anchor
  from which the chain resumes.
- Durable before acknowledged: :meth:`AuditLog.append` (and :meth:`record`) return only after the
  transaction holding the record has committed with ``synchronous=FULL`` (the WAL is fsynced;
  ``synchronous="normal"`` only hands it to the OS: it then survives a crash of the agent but
  not of the machine).
  Records submitted while a commit is running are committed together in the next one (group
  commit): one fsync for a whole batch.
- The chain head is read inside each ``BEGIN IMMEDIATE`` transaction, so several processes (the
  daemon and a CLI command recording a policy change) can append to one log safely.
- Storage cap: records not yet pruned may take ``max_bytes`` (body bytes plus a per-row
  allowance). Past it, ``fail_closed`` refuses new requests (:meth:`admit` raises
  :class:`AuditFull`, HTTP 503) and ``record_gap`` keeps serving without writing their records. In
  both modes what went unrecorded is counted durably and written as one ``audit.gap`` record as
  soon as there is room again: nothing is dropped silently.
- Room is kept for allowed traffic: a record submitted with ``shed=True`` (a refusal: denied,
  over a limit) is written only while the log holds less than :data:`SHED_AT` of ``max_bytes``;
  past that it is counted as unrecorded (the ``audit.gap`` record names how many), so refusals
  alone can never fill the log and turn ``fail_closed`` into a 503 for everyone.
- A checkpoint (Ed25519 over the head's seq and hash, :mod:`fleet.chain`) is written in
  the same transaction as the records it covers every ``checkpoint_every`` records, after
  ``checkpoint_interval_s`` with new records, and when the log closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.errors import AgentError, Overloaded
from fleet.chain import (
    GENESIS,
    Checkpoint,
    Entry,
    Report,
    Sealed,
    iso_time,
    make_checkpoint,
    seal_all,
    verify,
)
from fleet.device_key import DeviceKey, DevicePublicKey
from fleet.log import get_logger

if TYPE_CHECKING:
    from agent.config import Settings

log = get_logger(__name__)

ROW_OVERHEAD = 96
"""Bytes counted per record beyond its body (hash, rowid, b-tree cell), for the storage cap."""
RESERVE_FRACTION = 0.02
RESERVE_MIN = 256 << 10
"""A request admitted under the cap may still be recorded up to this much beyond it (the larger
of the fraction and the minimum): room for the records of requests in flight."""
PRUNE_AT = 0.8
"""Uploaded records are pruned once the log holds this fraction of ``max_bytes``."""
SHED_AT = 0.5
"""Refusals (records submitted with ``shed=True``) are written only below this fraction of
``max_bytes``; the rest of the log is kept for allowed requests."""
RECOUNT_S = 1.0
"""Near the cap, the size is recounted from the table at most this often (see ``_transact``)."""

OnFull = Literal["fail_closed", "record_gap"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, body TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (seq INTEGER PRIMARY KEY, body TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_META_DEFAULTS = {
    "schema": "1",
    "anchor_seq": "0",
    "anchor_hash": GENESIS,
    "uploaded_seq": "0",
    "unrecorded": "0",
    "refused": "0",
    "shed": "0",
    "gap_since": "",
}


class AuditError(AgentError):
    """The audit log cannot be opened or read."""


class AuditFull(Overloaded):
    """The audit log is full and cannot take the record of a new request (fail closed)."""

    code = "audit_full"

    def __init__(self, message: str, retry_after: float = 30.0) -> None:
        super().__init__(message, retry_after=retry_after, status=503)


class AuditUnavailable(Overloaded):
    """Writing the audit log failed (disk full, I/O error): requests are refused, not served blind."""

    code = "audit_unavailable"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=5.0, status=503)


def audit_path(state_dir: Path) -> Path:
    return state_dir / "audit" / "audit.db"


def agent_actor() -> dict[str, Any]:
    """The actor of records the agent writes on its own behalf (start-up, policy changes)."""
    import pwd

    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return {"agent": "edge-agent", "pid": os.getpid(), "uid": uid, "user": user, "role": "agent"}


@dataclass(frozen=True, slots=True)
class Stats:
    head_seq: int
    uploaded_seq: int
    anchor_seq: int
    used_bytes: int
    max_bytes: int
    unrecorded: int
    refused: int
    checkpoint_seq: int

    @property
    def backlog(self) -> int:
        return self.head_seq - self.uploaded_seq


class _Waiter:
    """Where a batch result goes: a concurrent future, or an asyncio future on its loop."""

    __slots__ = ("afut", "cfut", "loop")

    def __init__(
        self,
        cfut: Future[int] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        afut: asyncio.Future[int] | None = None,
    ) -> None:
        self.cfut, self.loop, self.afut = cfut, loop, afut


def _resolve_async(results: list[tuple[asyncio.Future[int], int | BaseException]]) -> None:
    for fut, value in results:
        if fut.done():
            continue
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)


class AuditLog:
    """The audit log at ``path``. Call :meth:`start` for the group-commit writer thread (the
    daemon); without it every call writes synchronously in the caller's thread (CLI commands)."""

    def __init__(
        self,
        path: Path,
        *,
        key: DeviceKey | None = None,
        max_bytes: int = 256 << 20,
        on_full: OnFull = "fail_closed",
        checkpoint_every: int = 1000,
        checkpoint_interval_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        batch_max: int = 8192,
        synchronous: Literal["full", "normal"] = "full",
    ) -> None:
        self.path = path
        self._key = key
        self.max_bytes = max_bytes
        self.on_full: OnFull = on_full
        self._cp_every = checkpoint_every
        self._cp_interval = checkpoint_interval_s
        self._clock = clock
        self._batch_max = batch_max
        self._synchronous = "NORMAL" if synchronous == "normal" else "FULL"
        self._cond = threading.Condition()
        self._queue: list[tuple[str, Any, _Waiter]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._conn: sqlite3.Connection | None = None
        self._conn_lock = threading.Lock()
        self._used = 0
        self._last_failure: AuditUnavailable | None = None
        self._unrecorded_pending = 0
        self._refused_pending = 0
        self._last_cp_time = clock()
        self._last_recount = float("-inf")
        self._create()

    # -- set-up -------------------------------------------------------------------------------

    def _create(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.exists():
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
                os.close(fd)
            conn = self._connect()
        except (OSError, sqlite3.Error) as exc:
            raise AuditError(f"cannot open the audit log {self.path}: {exc}") from None
        try:
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", list(_META_DEFAULTS.items()))
            conn.execute("COMMIT")
            row = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM records").fetchone()
            self._used = int(row[1]) + ROW_OVERHEAD * int(row[0])
        except sqlite3.Error as exc:
            raise AuditError(f"cannot open the audit log {self.path}: {exc}") from None
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        return conn

    def start(self) -> None:
        """Start the writer thread (group commit). Idempotent."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued and a final checkpoint, then stop the writer."""
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify()
            self._thread.join()
            self._thread = None
        else:
            self._sync([("checkpoint", None, _Waiter(cfut=Future()))])
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- writing ------------------------------------------------------------------------------

    def admit(self) -> None:
        """Raise :class:`AuditFull` when a new request must be refused (fail closed and full)."""
        if self.on_full == "fail_closed" and self._used >= self.max_bytes:
            self._submit("refused", None, _Waiter(cfut=Future()))
            raise AuditFull(
                f"the audit log is full ({self._used} of {self.max_bytes} bytes) and its records have "
                "not been uploaded; refusing new requests until they are"
            )

    def submit(self, entry: Entry, *, shed: bool = False) -> Future[int]:
        """Queue ``entry``; the future gives its seq once durable (0: not recorded, gap mode, or a
        ``shed`` record over :data:`SHED_AT`)."""
        waiter = _Waiter(cfut=Future())
        self._submit("shed" if shed else "rec", entry, waiter)
        assert waiter.cfut is not None
        return waiter.cfut

    async def append(self, entry: Entry, *, shed: bool = False) -> int:
        """Record ``entry`` and return its seq once it is on disk (0: not recorded, gap mode, or a
        ``shed`` record over :data:`SHED_AT`)."""
        loop = asyncio.get_running_loop()
        if self._thread is None:
            return await loop.run_in_executor(None, lambda: self.submit(entry, shed=shed).result())
        fut: asyncio.Future[int] = loop.create_future()
        self._submit("shed" if shed else "rec", entry, _Waiter(loop=loop, afut=fut))
        # Once queued the record is written even if this task is cancelled (the future is then
        # cancelled and its result dropped).
        return await fut

    def _append_sync(self, entry: Entry) -> int:
        return self.submit(entry).result()

    def record(
        self,
        action: str,
        resource: str | None,
        outcome: str,
        reason: str,
        details: dict[str, Any] | None = None,
        actor: dict[str, Any] | None = None,
    ) -> int:
        """Record an event synchronously (blocks until durable); the actor defaults to the agent."""
        entry = Entry(action, resource, outcome, reason, actor or agent_actor(), details or {})
        return self.submit(entry).result()

    def mark_uploaded(self, up_to_seq: int) -> int:
        """The hub acknowledged every record up to ``up_to_seq``; returns the new uploaded mark."""
        waiter = _Waiter(cfut=Future())
        self._submit("mark", int(up_to_seq), waiter)
        assert waiter.cfut is not None
        return waiter.cfut.result()

    def checkpoint(self) -> int:
        """Sign a checkpoint of the head now (if it has none); returns the head seq."""
        waiter = _Waiter(cfut=Future())
        self._submit("checkpoint", None, waiter)
        assert waiter.cfut is not None
        return waiter.cfut.result()

    def sign_at(self, seq: int) -> int:
        """Make sure record ``seq`` has a signed checkpoint (the uploader signs every batch at its
        last record, which the hub requires); returns ``seq``, or 0 without a key or record."""
        waiter = _Waiter(cfut=Future())
        self._submit("sign_at", int(seq), waiter)
        assert waiter.cfut is not None
        return waiter.cfut.result()

    def prune_uploaded(self) -> int:
        """Delete uploaded records now; returns how many were deleted."""
        waiter = _Waiter(cfut=Future())
        self._submit("prune", None, waiter)
        assert waiter.cfut is not None
        return waiter.cfut.result()

    def _submit(self, kind: str, payload: Any, waiter: _Waiter) -> None:
        if self._thread is None:
            self._sync([(kind, payload, waiter)])
            return
        with self._cond:
            self._queue.append((kind, payload, waiter))
            if len(self._queue) == 1:
                self._cond.notify()

    def _sync(self, items: list[tuple[str, Any, _Waiter]]) -> None:
        with self._conn_lock:
            if self._conn is None:
                self._conn = self._connect()
            self._commit(self._conn, items)

    def _run(self) -> None:
        conn = self._connect()
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait(timeout=self._cp_interval_wait())
                        if not self._queue and self._checkpoint_due():
                            break
                    items = self._queue[: self._batch_max]
                    del self._queue[: self._batch_max]
                    stop = self._stopping and not self._queue
                if stop:
                    items.append(("checkpoint", None, _Waiter(cfut=Future())))
                self._commit(conn, items)
                if stop:
                    return
        finally:
            conn.close()

    def _cp_interval_wait(self) -> float:
        return max(0.05, self._last_cp_time + self._cp_interval - self._clock())

    def _checkpoint_due(self) -> bool:
        return self._key is not None and self._clock() - self._last_cp_time >= self._cp_interval

    def _commit(self, conn: sqlite3.Connection, items: list[tuple[str, Any, _Waiter]]) -> None:
        results: list[int | BaseException] = [0] * len(items)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._transact(conn, items, results)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
        except Exception as exc:  # the writer must outlive any failure; callers get a 503
            log.error("audit_write_failed", error=str(exc), records=len(items))
            failure = AuditUnavailable(f"the audit log cannot be written: {exc}")
            results = [failure] * len(items)
            self._last_failure = failure
        else:
            self._last_failure = None
        self._deliver(items, results)

    def check_writable(self) -> None:
        """Raise :class:`AuditUnavailable` when the last commit failed (a full disk, an I/O
        error): a stream in progress stops instead of sending more text that may go unrecorded."""
        failure = self._last_failure
        if failure is not None:
            raise AuditUnavailable(str(failure))

    def _deliver(self, items: list[tuple[str, Any, _Waiter]], results: list[int | BaseException]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[int], int | BaseException]]] = {}
        for (_, _, waiter), value in zip(items, results, strict=True):
            if waiter.cfut is not None:
                if isinstance(value, BaseException):
                    waiter.cfut.set_exception(value)
                else:
                    waiter.cfut.set_result(value)
            elif waiter.loop is not None and waiter.afut is not None:
                by_loop.setdefault(waiter.loop, []).append((waiter.afut, value))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve_async, batch)

    def _transact(
        self,
        conn: sqlite3.Connection,
        items: list[tuple[str, Any, _Waiter]],
        results: list[int | BaseException],
    ) -> None:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        head = conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        head_seq, head_hash = (
            (int(head[0]), str(head[1])) if head else (int(meta["anchor_seq"]), meta["anchor_hash"])
        )
        now = self._clock()
        used = self._used  # kept in memory: summing the table on every commit would be O(n) ...
        if used >= PRUNE_AT * self.max_bytes and now - self._last_recount >= RECOUNT_S:
            # ... but near the cap, recount now and then: another process (`audit export
            # --mark-uploaded`) may have pruned records behind our back.
            row = conn.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM records").fetchone()
            used = int(row[1]) + ROW_OVERHEAD * int(row[0])
            self._last_recount = now
        unrecorded = int(meta["unrecorded"])
        refused = int(meta["refused"])
        shed = int(meta.get("shed", "0"))
        gap_since = meta["gap_since"]
        updates: dict[str, str] = {}

        # Prune uploaded records first when the log is getting full (or when asked to).
        uploaded = int(meta["uploaded_seq"])
        want_prune = any(k == "prune" for k, _, _ in items) or used >= PRUNE_AT * self.max_bytes
        pruned = 0
        if want_prune and uploaded > int(meta["anchor_seq"]):
            pruned, freed, anchor_hash = self._prune(conn, uploaded)
            used -= freed
            updates["anchor_seq"], updates["anchor_hash"] = str(uploaded), anchor_hash
            if not head:
                head_hash = anchor_hash

        used_base = used
        hard_cap = self.max_bytes + max(self.max_bytes * RESERVE_FRACTION, RESERVE_MIN)
        to_write: list[Entry] = []
        slots: list[int] = []  # index in items of each entry to write
        for i, (kind, payload, _) in enumerate(items):
            if kind == "refused":
                refused += 1
                gap_since = gap_since or iso_time(now)
            elif kind in ("rec", "shed"):
                size = _estimate(payload)
                if kind == "shed" and used + size > SHED_AT * self.max_bytes:
                    shed += 1  # a refusal: never at the cost of room for allowed requests
                    gap_since = gap_since or iso_time(now)
                    results[i] = 0
                elif self.on_full == "record_gap" and used + size > self.max_bytes:
                    unrecorded += 1
                    gap_since = gap_since or iso_time(now)
                    results[i] = 0
                elif used + size > hard_cap:
                    results[i] = AuditFull(f"the audit log is full ({used} of {self.max_bytes} bytes)")
                    refused += 1
                    gap_since = gap_since or iso_time(now)
                else:
                    to_write.append(payload)
                    slots.append(i)
                    used += size
        # One counted record for what went unrecorded, once there is room for it: below the cap
        # for requests, below the refusals' share for refusals (else every shed refusal would
        # write a gap record of its own).
        if ((unrecorded or refused) and used + 512 <= self.max_bytes) or (
            shed and used + 512 <= SHED_AT * self.max_bytes
        ):
            gap = Entry(
                "audit.gap",
                None,
                "gap",
                "the audit log was full: requests went unrecorded (record_gap) or were refused (fail_closed)",
                agent_actor(),
                {
                    "unrecorded": unrecorded,
                    "refused": refused,
                    "refusals_unrecorded": shed,
                    "since": gap_since,
                    "until": iso_time(now),
                },
            )
            to_write.insert(0, gap)
            slots.insert(0, -1)
            log.warning(
                "audit_gap_recorded", unrecorded=unrecorded, refused=refused, refusals_unrecorded=shed
            )
            unrecorded = refused = shed = 0
            gap_since = ""
        sealed = seal_all(to_write, head_seq, head_hash, now)
        used = used_base + sum(len(x.body) + ROW_OVERHEAD for x in sealed)
        if sealed:
            conn.executemany(
                "INSERT INTO records (seq, body, hash) VALUES (?, ?, ?)",
                [(s.seq, s.body, s.hash) for s in sealed],
            )
            head_seq, head_hash = sealed[-1].seq, sealed[-1].hash
        for slot, s in zip(slots, sealed, strict=True):
            if slot >= 0:
                results[slot] = s.seq

        for i, (kind, payload, _) in enumerate(items):
            if kind == "mark":
                uploaded = max(uploaded, min(int(payload), head_seq))
                updates["uploaded_seq"] = str(uploaded)
                results[i] = uploaded
            elif kind == "prune":
                results[i] = pruned
            elif kind == "checkpoint":
                results[i] = head_seq
            elif kind == "sign_at":
                results[i] = self._sign_at(conn, int(payload), now)

        cp = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM checkpoints").fetchone()
        cp_seq = int(cp[0])
        forced = any(k == "checkpoint" for k, _, _ in items)
        due = head_seq - cp_seq >= self._cp_every or now - self._last_cp_time >= self._cp_interval or forced
        if self._key is not None and head_seq > cp_seq and due:
            c = make_checkpoint(head_seq, head_hash, self._key.key_id, now, self._key.sign)
            conn.execute(
                "INSERT INTO checkpoints (seq, body, signature) VALUES (?, ?, ?)",
                (c.seq, c.body, c.signature),
            )
            self._last_cp_time = now
        elif head_seq == cp_seq:
            self._last_cp_time = now

        updates.update(unrecorded=str(unrecorded), refused=str(refused), shed=str(shed), gap_since=gap_since)
        changed = [(v, k) for k, v in updates.items() if meta.get(k) != v]
        if changed:  # most commits change nothing here: one page less to write and fsync
            conn.executemany("UPDATE meta SET value = ? WHERE key = ?", changed)
        self._used = used

    def _sign_at(self, conn: sqlite3.Connection, seq: int, now: float) -> int:
        if self._key is None:
            return 0
        if conn.execute("SELECT 1 FROM checkpoints WHERE seq = ?", (seq,)).fetchone():
            return seq
        row = conn.execute("SELECT hash FROM records WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            return 0
        c = make_checkpoint(seq, str(row[0]), self._key.key_id, now, self._key.sign)
        conn.execute(
            "INSERT INTO checkpoints (seq, body, signature) VALUES (?, ?, ?)", (c.seq, c.body, c.signature)
        )
        return seq

    def _prune(self, conn: sqlite3.Connection, upto: int) -> tuple[int, int, str]:
        row = conn.execute("SELECT hash FROM records WHERE seq = ?", (upto,)).fetchone()
        if row is None:
            raise sqlite3.IntegrityError(f"uploaded record {upto} is not in the log")
        stats = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM records WHERE seq <= ?", (upto,)
        ).fetchone()
        conn.execute("DELETE FROM records WHERE seq <= ?", (upto,))
        conn.execute("DELETE FROM checkpoints WHERE seq < ?", (upto,))
        count, size = int(stats[0]), int(stats[1])
        log.info("audit_pruned", records=count, up_to_seq=upto)
        return count, size + ROW_OVERHEAD * count, str(row[0])

    # -- reading ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as exc:
            raise AuditError(f"cannot read the audit log {self.path}: {exc}") from None
        try:
            conn.execute("PRAGMA query_only=ON")
            yield conn
        except sqlite3.Error as exc:
            raise AuditError(f"cannot read the audit log {self.path}: {exc}") from None
        finally:
            conn.close()

    def stats(self) -> Stats:
        with self._reader() as conn:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            head = conn.execute("SELECT MAX(seq) FROM records").fetchone()[0]
            cp = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM checkpoints").fetchone()[0]
        anchor = int(meta["anchor_seq"])
        return Stats(
            head_seq=int(head) if head is not None else anchor,
            uploaded_seq=int(meta["uploaded_seq"]),
            anchor_seq=anchor,
            used_bytes=self._used,
            max_bytes=self.max_bytes,
            unrecorded=int(meta["unrecorded"]),
            refused=int(meta["refused"]),
            checkpoint_seq=int(cp),
        )

    def backlog(self) -> int:
        """Records not yet acknowledged by the hub."""
        return self.stats().backlog

    def pending(self, limit: int) -> list[Sealed]:
        """Up to ``limit`` records not yet uploaded, oldest first (for the sync uploader)."""
        with self._reader() as conn:
            uploaded = int(conn.execute("SELECT value FROM meta WHERE key = 'uploaded_seq'").fetchone()[0])
            rows = conn.execute(
                "SELECT seq, body, hash FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (uploaded, limit)
            ).fetchall()
        return [_sealed(r) for r in rows]

    def tail(self, n: int) -> list[Sealed]:
        with self._reader() as conn:
            rows = conn.execute(
                "SELECT seq, body, hash FROM records ORDER BY seq DESC LIMIT ?", (n,)
            ).fetchall()
        return [_sealed(r) for r in reversed(rows)]

    def iter_records(self, after_seq: int = 0, chunk: int = 2000) -> Iterator[Sealed]:
        """Every record after ``after_seq`` in stored order, read in chunks."""
        last = after_seq
        while True:
            with self._reader() as conn:
                rows = conn.execute(
                    "SELECT seq, body, hash FROM records WHERE seq > ? ORDER BY seq LIMIT ?", (last, chunk)
                ).fetchall()
            if not rows:
                return
            for r in rows:
                yield _sealed(r)
            last = int(rows[-1][0])

    def checkpoints(self) -> list[Checkpoint]:
        with self._reader() as conn:
            rows = conn.execute("SELECT seq, body, signature FROM checkpoints ORDER BY seq").fetchall()
        return [Checkpoint(int(r[0]), str(r[1]), str(r[2])) for r in rows]

    def anchor(self) -> tuple[int, str]:
        with self._reader() as conn:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        return int(meta["anchor_seq"]), str(meta["anchor_hash"])

    def verify(self, keys: list[DevicePublicKey]) -> Report:
        """Verify the whole stored log (one consistent snapshot) against ``keys``."""
        with self._reader() as conn:
            conn.execute("BEGIN")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            cps = [
                Checkpoint(int(r[0]), str(r[1]), str(r[2]))
                for r in conn.execute("SELECT seq, body, signature FROM checkpoints ORDER BY seq")
            ]
            rows = (_sealed(r) for r in conn.execute("SELECT seq, body, hash FROM records ORDER BY seq"))
            report = verify(rows, cps, keys, (int(meta["anchor_seq"]), str(meta["anchor_hash"])))
            conn.execute("COMMIT")
        return report


def _sealed(row: tuple[Any, ...]) -> Sealed:
    return Sealed(int(row[0]), str(row[1]), str(row[2]))


def _estimate(entry: Entry) -> int:
    """Bytes a record will take, for the cap decision before sealing (exact size follows)."""
    return (
        320
        + len(entry.reason)
        + len(entry.action)
        + len(entry.resource or "")
        + ROW_OVERHEAD
        + 24 * (len(entry.details) + len(entry.actor))
    )


def open_log(settings: Settings) -> AuditLog:
    """The device's audit log as configured, for a command that records an event outside the
    daemon (``edge-agent enroll``, ``registry import``): ``open_log(s).record(...)``. Safe while
    the daemon runs (each append is its own transaction on the shared chain)."""
    from fleet.device_key import ensure_device_key

    a = settings.audit
    return AuditLog(
        audit_path(settings.state_dir),
        key=ensure_device_key(settings.state_dir),
        max_bytes=a.max_bytes,
        on_full=a.on_full,
        checkpoint_every=a.checkpoint_every,
        checkpoint_interval_s=a.checkpoint_interval_s,
        synchronous=a.synchronous,
    )


def open_existing(path: Path, settings: Settings | None = None) -> AuditLog:
    """An :class:`AuditLog` on a log that must already exist (the CLI's commands), with the
    configured cap when ``settings`` is given; it signs no checkpoints."""
    if not path.is_file():
        raise AuditError(f"no audit log at {path}")
    if settings is None:
        return AuditLog(path)
    a = settings.audit
    return AuditLog(path, max_bytes=a.max_bytes, on_full=a.on_full, synchronous=a.synchronous)


__all__ = [
    "ROW_OVERHEAD",
    "AuditError",
    "AuditFull",
    "AuditLog",
    "AuditUnavailable",
    "OnFull",
    "Stats",
    "agent_actor",
    "audit_path",
    "open_existing",
    "open_log",
]
