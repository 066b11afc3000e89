"""The hub's database (SQLite): audit records by (device, seq), device inventory, events.

Audit invariants:
- Storing is idempotent: a record already held (same device and seq) is accepted again only if
  its hash is the one stored; a different hash for a held seq is refused as ``rewritten``.
- New records are stored only if they extend the device's chain without a gap: they are checked
  with :func:`fleet.chain.verify` from the device's last stored ``(seq, hash)``, against the
  checkpoints of the batch. A batch with any problem stores nothing.
- Audit keys are registered, never learnt: the operator registers a device's audit public key
  (``edge-hub device register ID --audit-key HEX``, printed by ``edge-agent enroll``); a batch
  from a device with no registered key is refused (``key_not_registered``), one naming another
  key is refused, and every batch that brings new records must carry a checkpoint at its last
  record signed by the device's current key (``unsigned`` otherwise), so no record is stored on
  hash links alone. Keys pinned on first use by older hubs are carried over as registered.
  Re-verification (:meth:`HubStore.verify_device`) accepts every key ever registered for the
  device (a rotated key still verifies its older checkpoints).
- The acknowledgement names the highest seq held contiguously, capped at the batch's last seq (a
  replayed batch is answered with what it carried); the device marks records uploaded only up to
  it, so duplicates and retries are harmless.
- A batch that arrives ahead of its predecessor (several hub workers split a device's batches in
  flight) is *held* (``audit_pending``, at most :data:`MAX_PENDING` per device) once it verifies
  on its own: the registered key's signature at its last record, every hash, its internal chain
  from the ``prev`` its first record names. Held records are not part of the chain and are never
  acknowledged: the batch is answered with the chain's end as before. Whoever extends the chain
  (any worker, under the device's row lock) promotes in the same transaction every held batch
  that then links to it by hash (the ``prev`` of its next record, or its own hash at the chain's
  end), and acknowledges the new end; held batches that are behind the chain or do not link are
  deleted. So the stored chain is exactly the one in-order arrival would have built.
- A device whose log was pruned before the hub first heard of it is *anchored* at the anchor its
  batches declare (``anchor_seq``): its chain is verified from there on. A first batch that does
  not start right after that anchor is a gap, never a new anchor (lost batches are re-sent).

Inventory: the last reported state and online status of each device (devices publish no retained
message: the store is the inventory's memory).

Engines: SQLite (a path, the embedded default) or PostgreSQL (a ``postgresql://`` URL), through
:mod:`hub.sync.db`; the schema is versioned (:mod:`hub.sync.migrations`). Several writers of one
device's batches at once (hub workers on several hosts sharing the audit subscription) are
serialised on the device's row: SQLite by its write transaction, PostgreSQL by ``SELECT ... FOR
UPDATE`` on ``devices``; (device, seq) is the audit table's primary key, so a record is held once.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.chain import GENESIS, Checkpoint, Sealed, verify
from fleet.device_key import DeviceKeyError, DevicePublicKey
from fleet.log import get_logger
from fleet.messages import AuditAck, AuditBatch, Event, StateReport, Status, check_device_id
from hub.sync.db import Database, Tx, describe
from hub.sync.migrations import open_database

log = get_logger(__name__)

MAX_PENDING = 8
"""Batches held per device ahead of their predecessor (a device keeps 4 in flight)."""


@dataclass(frozen=True, slots=True)
class DeviceRow:
    device: str
    online: bool
    state: StateReport | None
    seen: float | None
    audit_seq: int
    problem: str | None

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "online": self.online,
            "seen": self.seen,
            "audit_seq": self.audit_seq,
            "problem": self.problem,
            "state": json.loads(self.state.encode()) if self.state is not None else None,
        }


class HubStore:
    """The hub database (SQLite file or PostgreSQL URL, :func:`hub.sync.migrations.open_database`), its
    schema migrated on open; safe to share between threads, processes and (PostgreSQL) hosts."""

    def __init__(self, target: str | Path) -> None:
        self.target = target
        self.db: Database = open_database(target)

    def __repr__(self) -> str:
        return f"HubStore({describe(self.target)!r})"

    def register_key(self, device: str, key_hex: str, now: float | None = None) -> None:
        """Register ``key_hex`` (Ed25519 public key, hex) as ``device``'s current audit key.
        :class:`DeviceKeyError` for a malformed key; ProtocolError for a bad or reserved id."""
        check_device_id(device)
        DevicePublicKey.from_hex(key_hex)
        with self._tx() as conn:
            conn.execute("INSERT INTO devices (device) VALUES (?) ON CONFLICT DO NOTHING", (device,))
            conn.execute(
                "INSERT INTO audit_keys (device, key, registered) VALUES (?, ?, ?) "
                "ON CONFLICT (device, key) DO UPDATE SET registered = excluded.registered",
                (device, key_hex, time.time() if now is None else now),
            )
            conn.execute("UPDATE devices SET key = ? WHERE device = ?", (key_hex, device))

    def audit_keys(self, device: str) -> list[str]:
        """The audit keys registered for ``device``, the current (latest registered) first."""
        rows = self.db.query(
            "SELECT key FROM audit_keys WHERE device = ? ORDER BY registered DESC", (device,)
        )
        return [str(k) for (k,) in rows]

    def close(self) -> None:
        self.db.close()

    def _tx(self) -> contextlib.AbstractContextManager[Tx]:
        return self.db.tx()

    # --- audit -------------------------------------------------------------------------------

    def store_audit(self, device: str, batch: AuditBatch, now: float | None = None) -> AuditAck:
        """Store a batch idempotently; return the acknowledgement to send back."""
        now = time.time() if now is None else now
        if batch.device != device:
            return AuditAck(-1, Status.BAD_REQUEST.value, f"batch names device {batch.device!r}")
        with self._tx() as conn:
            conn.execute("INSERT INTO devices (device) VALUES (?) ON CONFLICT DO NOTHING", (device,))
            # the device's row is the lock of its chain: one writer extends it at a time
            lock = self.db.for_update
            sql = f"SELECT key, anchor_seq, last_seq, last_hash FROM devices WHERE device = ?{lock}"  # noqa: S608
            _pinned, anchor_seq, last_seq, last_hash = conn.execute(sql, (device,)).fetchone()
            anchor_seq, last_seq, last_hash = int(anchor_seq), int(last_seq), str(last_hash)
            registered = conn.execute(
                "SELECT key FROM audit_keys WHERE device = ? ORDER BY registered DESC LIMIT 1", (device,)
            ).fetchone()
            if registered is None:
                return AuditAck(
                    last_seq,
                    Status.KEY_NOT_REGISTERED.value,
                    f"no audit key is registered for {device}: edge-hub device register {device} "
                    "--audit-key <hex from edge-agent enroll>",
                )
            key_hex = str(registered[0])
            if batch.key != key_hex:
                return self._problem(
                    conn, device, last_seq, "the batch's key is not the device's registered audit key"
                )
            if last_seq == 0 and not last_hash and batch.first_seq == batch.anchor + 1:
                # First contact: the chain starts at the device's declared anchor (0 unless its log
                # was pruned before this hub heard of it). A batch that starts later is ahead of
                # its predecessor (held below), never a new start.
                first_body = json.loads(batch.rows[0][1])
                anchor_seq = batch.anchor
                last_seq = anchor_seq
                last_hash = GENESIS if anchor_seq == 0 else str(first_body.get("prev", ""))
                conn.execute(
                    "UPDATE devices SET anchor_seq = ?, anchor_hash = ?, last_seq = ?, last_hash = ? "
                    "WHERE device = ?",
                    (anchor_seq, last_hash, last_seq, last_hash, device),
                )
            held = [r for r in batch.rows if r[0] <= last_seq]
            if held:
                stored = dict(
                    conn.execute(
                        "SELECT seq, hash FROM audit WHERE device = ? AND seq BETWEEN ? AND ?",
                        (device, held[0][0], held[-1][0]),
                    ).fetchall()
                )
                for seq, _body, hash_ in held:
                    if seq > anchor_seq and stored.get(seq) not in (None, hash_):
                        return self._problem(
                            conn, device, last_seq, f"record {seq} differs from the one held (rewritten)"
                        )
            new = [r for r in batch.rows if r[0] > last_seq]
            if not new:  # a replay: acknowledge what this batch carried, never more (the device
                # acts only on acks within the records it sent, agent/sync/audit_upload.py)
                return AuditAck(min(last_seq, batch.last_seq))
            try:
                keys = [DevicePublicKey.from_hex(key_hex)]
            except DeviceKeyError as exc:
                return self._problem(conn, device, last_seq, f"registered key unusable: {exc}")
            cps = [Checkpoint(s, b, sig) for s, b, sig in batch.checkpoints if s > last_seq]
            if not any(c.seq == batch.last_seq for c in cps):
                return AuditAck(
                    last_seq,
                    Status.UNSIGNED.value,
                    f"no checkpoint at record {batch.last_seq}: a batch must be signed at its last record",
                )
            if new[0][0] != last_seq + 1:  # ahead of its predecessor (at another worker, or lost)
                return self._hold(conn, device, last_seq, new, cps, keys, now)
            report = verify((Sealed(s, b, h) for s, b, h in new), cps, keys, (last_seq, last_hash))
            if not report.ok:
                first = report.first_problem
                assert first is not None
                return self._problem(conn, device, last_seq, first.message)
            self._insert(conn, device, new, cps, now)
            last_seq, last_hash = self._promote(conn, device, report.last_seq, report.last_hash, now)
            conn.execute(
                "UPDATE devices SET last_seq = ?, last_hash = ?, problem = NULL WHERE device = ?",
                (last_seq, last_hash, device),
            )
            return AuditAck(last_seq)

    def _insert(
        self, conn: Tx, device: str, rows: list[tuple[int, str, str]], cps: list[Checkpoint], now: float
    ) -> None:
        """Insert verified records that extend the device's chain (all beyond its stored end, under
        its row lock: none is held yet, so a duplicate is an error, not skipped), and their
        checkpoints (PostgreSQL: ``COPY``, :meth:`Database.insert_rows`)."""
        self.db.insert_rows(
            conn,
            "audit",
            ("device", "seq", "hash", "body", "time", "received"),
            [(device, s, h, b, _time_of(b), now) for s, b, h in rows],
        )
        conn.executemany(
            "INSERT INTO checkpoints (device, seq, body, signature) VALUES (?, ?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            [(device, c.seq, c.body, c.signature) for c in cps],
        )

    def _hold(
        self,
        conn: Tx,
        device: str,
        last_seq: int,
        new: list[tuple[int, str, str]],
        cps: list[Checkpoint],
        keys: list[DevicePublicKey],
        now: float,
    ) -> AuditAck:
        """Keep a batch that arrived ahead of its predecessor as *pending*: verified on its own
        (signature at its last record, hashes, its internal chain from the ``prev`` its first record
        names), stored apart from the chain, promoted by :meth:`_promote` when the gap closes. At
        most :data:`MAX_PENDING` batches per device; beyond that it is a plain gap (re-sent)."""
        gap = f"gap: expected record {last_seq + 1}"
        (held,) = conn.execute("SELECT COUNT(*) FROM audit_pending WHERE device = ?", (device,)).fetchone()
        if int(held) >= MAX_PENDING:
            return AuditAck(last_seq, Status.OK.value, gap)
        prev = json.loads(new[0][1]).get("prev") if new[0][1].startswith("{") else None
        if not isinstance(prev, str):
            return self._problem(conn, device, last_seq, f"record {new[0][0]} names no previous hash")
        report = verify((Sealed(s, b, h) for s, b, h in new), cps, keys, (new[0][0] - 1, prev))
        if not report.ok:
            first = report.first_problem
            assert first is not None
            return self._problem(conn, device, last_seq, first.message)
        conn.execute(
            "INSERT INTO audit_pending (device, first_seq, last_seq, prev_hash, last_hash, rows, "
            "checkpoints, received) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device, first_seq) DO "
            "UPDATE SET last_seq = excluded.last_seq, prev_hash = excluded.prev_hash, "
            "last_hash = excluded.last_hash, rows = excluded.rows, checkpoints = excluded.checkpoints, "
            "received = excluded.received",
            (
                device,
                new[0][0],
                report.last_seq,
                prev,
                report.last_hash,
                json.dumps(new, separators=(",", ":")),
                json.dumps([[c.seq, c.body, c.signature] for c in cps], separators=(",", ":")),
                now,
            ),
        )
        return AuditAck(last_seq, Status.OK.value, f"{gap}; records {new[0][0]}-{report.last_seq} held")

    def _promote(self, conn: Tx, device: str, last_seq: int, last_hash: str, now: float) -> tuple[int, str]:
        """Move pending batches that now continue the chain ``(last_seq, last_hash)`` into it, in
        order; returns the new end of the chain. A pending batch links when the hash it holds at
        ``last_seq`` (or the ``prev`` of its first record) is ``last_hash``: its own chain was
        verified when it was held, so it then extends the stored chain exactly as if it had arrived
        in order. Pending batches wholly behind the chain, or that do not link (another chain),
        are deleted (logged; the device re-sends what no ack covered)."""
        while True:
            rows = conn.execute(
                "SELECT first_seq, last_seq, prev_hash, rows, checkpoints FROM audit_pending "
                "WHERE device = ? AND first_seq <= ? ORDER BY first_seq",
                (device, last_seq + 1),
            ).fetchall()
            if not rows:
                return last_seq, last_hash
            conn.execute(
                "DELETE FROM audit_pending WHERE device = ? AND first_seq <= ?", (device, last_seq + 1)
            )
            extended = False
            for first, last, prev, rows_json, cps_json in rows:
                if int(last) <= last_seq:
                    continue
                held = [(int(s), str(b), str(h)) for s, b, h in json.loads(rows_json)]
                link = str(prev) if int(first) == last_seq + 1 else _hash_at(held, last_seq)
                if link != last_hash:
                    log.warning("audit_pending_dropped", device=device, first=int(first), last=int(last))
                    continue
                cps = [Checkpoint(int(s), str(b), str(sig)) for s, b, sig in json.loads(cps_json)]
                fresh = [r for r in held if r[0] > last_seq]
                self._insert(conn, device, fresh, [c for c in cps if c.seq > last_seq], now)
                last_seq, last_hash = held[-1][0], held[-1][2]
                extended = True
            if not extended:
                return last_seq, last_hash

    def _problem(self, conn: Tx, device: str, last_seq: int, detail: str) -> AuditAck:
        conn.execute("UPDATE devices SET problem = ? WHERE device = ?", (detail, device))
        conn.execute(
            "INSERT INTO events (device, kind, status, target, detail, at) VALUES (?, ?, ?, ?, ?, ?)",
            (device, "audit", Status.CHAIN_BROKEN.value, "", detail, time.time()),
        )
        return AuditAck(last_seq, Status.CHAIN_BROKEN.value, detail)

    def audit_records(
        self, device: str, since: str | None = None, limit: int = 100_000
    ) -> list[dict[str, Any]]:
        """Stored records of ``device`` (optionally with ``time >= since``, ISO 8601), by seq."""
        sql = "SELECT body FROM audit WHERE device = ?"
        args: list[Any] = [device]
        if since:
            sql += " AND time >= ?"
            args.append(since)
        sql += " ORDER BY seq LIMIT ?"
        args.append(limit)
        return [json.loads(r[0]) for r in self.db.query(sql, args)]

    def verify_device(self, device: str) -> tuple[int, list[str]]:
        """Re-verify the whole stored chain of ``device``: (records, problems)."""
        row = self.db.one("SELECT key, anchor_seq, anchor_hash FROM devices WHERE device = ?", (device,))
        if row is None:
            return 0, [f"unknown device {device}"]
        _pinned, anchor_seq, anchor_hash = row
        keys = [DevicePublicKey.from_hex(k) for k in self.audit_keys(device)]
        rows = (
            Sealed(int(s), str(b), str(h))
            for s, b, h in self.db.query(
                "SELECT seq, body, hash FROM audit WHERE device = ? ORDER BY seq", (device,)
            )
        )
        cps = [
            Checkpoint(int(s), str(b), str(sig))
            for s, b, sig in self.db.query(
                "SELECT seq, body, signature FROM checkpoints WHERE device = ? ORDER BY seq", (device,)
            )
        ]
        report = verify(rows, cps, keys, (int(anchor_seq), str(anchor_hash) or GENESIS))
        return report.records, [p.message for p in report.problems]

    def audit_count(self, device: str) -> tuple[int, int]:
        """(number of stored records, number of distinct seqs) — equal unless something is wrong."""
        row = self.db.one("SELECT COUNT(*), COUNT(DISTINCT seq) FROM audit WHERE device = ?", (device,))
        assert row is not None
        n, distinct = row
        return int(n), int(distinct)

    # --- inventory and events ----------------------------------------------------------------

    def record_state(self, device: str, report: StateReport, now: float | None = None) -> None:
        self.record_states([(device, report)], now)

    def record_states(self, reports: Sequence[tuple[str, StateReport]], now: float | None = None) -> None:
        """Store each device's reported state, all in one transaction (a report naming another
        device than its key is skipped)."""
        at = time.time() if now is None else now
        rows = [(device, r.encode().decode(), at) for device, r in reports if r.device == device]
        if not rows:
            return
        with self._tx() as conn:
            conn.executemany(
                "INSERT INTO devices (device, state, seen) VALUES (?, ?, ?) "
                "ON CONFLICT (device) DO UPDATE SET state = excluded.state, seen = excluded.seen",
                rows,
            )

    def record_status(self, device: str, online: bool, now: float | None = None) -> None:
        self.record_statuses([(device, online)], now)

    def record_statuses(self, statuses: Sequence[tuple[str, bool]], now: float | None = None) -> None:
        """Store each device's online status, all in one transaction."""
        if not statuses:
            return
        at = time.time() if now is None else now
        with self._tx() as conn:
            conn.executemany(
                "INSERT INTO devices (device, online, seen) VALUES (?, ?, ?) "
                "ON CONFLICT (device) DO UPDATE SET online = excluded.online, seen = excluded.seen",
                [(device, int(online), at) for device, online in statuses],
            )

    def record_event(self, device: str, event: Event, now: float | None = None) -> bool:
        """Store ``event``; an event whose id is already stored for ``device`` is ignored.

        Returns whether it was new (a redelivery after a lost PUBACK returns False).
        """
        with self._tx() as conn:
            cursor = conn.execute(
                "INSERT INTO events (device, kind, status, target, detail, at, event_id)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (
                    device,
                    event.kind,
                    event.status,
                    event.target,
                    event.detail,
                    event.at or (now or time.time()),
                    event.id or None,
                ),
            )
            return cursor.rowcount == 1

    def events(self, device: str | None = None, limit: int = 1000) -> list[tuple[str, Event]]:
        sql = "SELECT device, kind, status, target, detail, at, event_id FROM events"
        args: list[Any] = []
        if device is not None:
            sql += " WHERE device = ?"
            args.append(device)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        return [(d, Event(k, s, t, det, at, i or "")) for d, k, s, t, det, at, i in self.db.query(sql, args)]

    def devices(self) -> list[DeviceRow]:
        out = []
        for device, online, state, seen, last_seq, problem in self.db.query(
            "SELECT device, online, state, seen, last_seq, problem FROM devices ORDER BY device"
        ):
            report = StateReport.decode(state.encode()) if state else None
            out.append(DeviceRow(device, bool(online), report, seen, int(last_seq), problem))
        return out

    def iter_devices(self) -> Iterator[str]:
        for (device,) in self.db.query("SELECT device FROM devices ORDER BY device"):
            yield str(device)


def _hash_at(rows: list[tuple[int, str, str]], seq: int) -> str | None:
    return next((h for s, _b, h in rows if s == seq), None)


def _time_of(body: str) -> str | None:
    """The record's ``time`` from its canonical body without parsing it again (verify did)."""
    start = body.find('"time":"')
    if start == -1:
        return None
    start += 8
    end = body.find('"', start)
    return body[start:end] if 0 < end - start <= 40 else None


__all__ = ["DeviceRow", "HubStore"]
