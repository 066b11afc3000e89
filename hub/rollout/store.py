"""Rollout tables and queries on the hub database (the store's connection API, plain SQL).

Tables: ``rollouts`` (one row per rollout: what moves, the waves, the thresholds, the state, the
current wave and when it started, the baseline measured on the previous version),
``rollout_devices`` (which wave each box of the group belongs to, fixed at start) and
``rollout_log`` (every decision, in order). Each decision is also an event of device ``hub``,
kind ``rollout``, in the hub's events table, so ``edge-hub`` shows it with the devices' events.

Invariants: ids are allocated inside the writing transaction (``MAX(id) + 1``, no engine-specific
autoincrement; the table is locked for it on PostgreSQL, :meth:`hub.sync.db.Database.lock_table`);
at most one rollout per group is *active* (``starting``, ``running``, ``paused``,
``aborting``): :meth:`RolloutStore.create` refuses a second. The SQL is standard (no ``INSERT OR``,
no ``WITHOUT ROWID``) and runs on both engines; the tables are created by schema version 2
(hub/sync/migrations.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from hub.sync.store import HubStore

ACTIVE = ("starting", "running", "paused", "aborting", "rolling_back")
"""States of a rollout that still acts (one per group)."""
_COLUMNS = (
    "id, grp, model, version, previous, waves, criteria, state, wave, wave_started, waived_wave, "
    "baseline, reason, created, updated"
)


@dataclass
class Rollout:
    id: int
    group: str
    model: str
    version: str
    previous: str
    waves: list[int]
    """cumulative box counts: wave i holds the first ``waves[i]`` boxes of the order"""
    criteria: dict[str, float]
    state: str
    wave: int
    wave_started: float
    waived_wave: int
    """a wave the operator resumed after a health pause: its speed checks no longer pause it"""
    baseline: dict[str, Any]
    reason: str
    created: float
    updated: float
    devices: dict[str, int] = field(default_factory=dict)
    """device -> wave index"""

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "group": self.group,
            "model": self.model,
            "version": self.version,
            "previous": self.previous,
            "waves": self.waves,
            "criteria": self.criteria,
            "state": self.state,
            "wave": self.wave,
            "wave_started": self.wave_started,
            "baseline": self.baseline,
            "reason": self.reason,
            "created": self.created,
            "updated": self.updated,
        }


class RolloutStore:
    """Rollout rows in the hub database of ``store`` (created on first use)."""

    def __init__(self, store: HubStore) -> None:
        self.store = store
        self.db = store.db

    def create(
        self,
        group: str,
        model: str,
        version: str,
        previous: str,
        waves: list[int],
        criteria: dict[str, float],
        order: list[str],
        now: float | None = None,
    ) -> Rollout:
        """A new rollout in state ``starting`` (the controller signs its first wave);
        ``order`` is the boxes in wave order. ValueError when the group has an active rollout."""
        now = time.time() if now is None else now
        with self.db.tx() as conn:
            self.db.lock_table(conn, "rollouts")
            marks = ", ".join("?" for _ in ACTIVE)
            busy = conn.execute(
                f"SELECT id FROM rollouts WHERE grp = ? AND state IN ({marks})",  # noqa: S608 (constants)
                (group, *ACTIVE),
            ).fetchone()
            if busy is not None:
                raise ValueError(f"group {group} has rollout {busy[0]} in progress (abort it first)")
            (top,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM rollouts").fetchone()
            rid = int(top) + 1
            conn.execute(
                f"INSERT INTO rollouts ({_COLUMNS}) VALUES ({', '.join('?' * 15)})",  # noqa: S608 (constants)
                (
                    rid, group, model, version, previous, json.dumps(waves), json.dumps(criteria),
                    "starting", 0, now, -1, "{}", "", now, now,
                ),
            )  # fmt: skip
            for i, device in enumerate(order):
                wave = next(w for w, count in enumerate(waves) if i < count)
                conn.execute(
                    "INSERT INTO rollout_devices (rollout, device, wave) VALUES (?, ?, ?)",
                    (rid, device, wave),
                )
        rollout = self.get(rid)
        assert rollout is not None
        return rollout

    def get(self, rid: int) -> Rollout | None:
        sql = f"SELECT {_COLUMNS} FROM rollouts WHERE id = ?"  # noqa: S608 (constants)
        row = self.db.one(sql, (rid,))
        if row is None:
            return None
        r = _rollout(row)
        r.devices = {
            str(d): int(w)
            for d, w in self.db.query("SELECT device, wave FROM rollout_devices WHERE rollout = ?", (rid,))
        }
        return r

    def active(self) -> list[Rollout]:
        marks = ", ".join("?" for _ in ACTIVE)
        ids = self.db.query(
            f"SELECT id FROM rollouts WHERE state IN ({marks}) ORDER BY id",  # noqa: S608 (constants)
            ACTIVE,
        )
        return [r for (rid,) in ids if (r := self.get(int(rid))) is not None]

    def latest(self, group: str | None = None) -> Rollout | None:
        sql, args = "SELECT MAX(id) FROM rollouts", tuple[str, ...]()
        if group is not None:
            sql, args = sql + " WHERE grp = ?", (group,)
        row = self.db.one(sql, args)
        rid = row[0] if row is not None else None
        return self.get(int(rid)) if rid is not None else None

    def update(self, rid: int, now: float | None = None, **values: Any) -> None:
        """Set columns (``state``, ``wave``, ``wave_started``, ``waived_wave``, ``baseline``, ``reason``)."""
        with self.db.tx() as conn:
            self._update(conn, rid, time.time() if now is None else now, values)

    def log(self, rollout: Rollout, decision: str, detail: str, now: float | None = None) -> None:
        """Record a decision in the rollout's log and as a hub event (kind ``rollout``)."""
        with self.db.tx() as conn:
            self._log(conn, rollout, decision, detail, time.time() if now is None else now)

    def transition(
        self, rollout: Rollout, decision: str, detail: str, now: float | None = None, **values: Any
    ) -> None:
        """:meth:`update` and :meth:`log` in one transaction: a reader never sees the new state
        without the decision that made it (or the other way round)."""
        now = time.time() if now is None else now
        with self.db.tx() as conn:
            self._update(conn, rollout.id, now, values)
            self._log(conn, rollout, decision, detail, now)

    @staticmethod
    def _update(conn: Any, rid: int, now: float, values: dict[str, Any]) -> None:
        allowed = {"state", "wave", "wave_started", "waived_wave", "baseline", "reason"}
        unknown = set(values) - allowed
        if unknown:
            raise ValueError(f"unknown rollout columns: {', '.join(sorted(unknown))}")
        if "baseline" in values:
            values = {**values, "baseline": json.dumps(values["baseline"], sort_keys=True)}
        sets = ", ".join(f"{k} = ?" for k in values)
        conn.execute(
            f"UPDATE rollouts SET {sets}, updated = ? WHERE id = ?",  # noqa: S608 (checked column names)
            (*values.values(), now, rid),
        )

    def _log(self, conn: Any, rollout: Rollout, decision: str, detail: str, now: float) -> None:
        target = f"rollouts/{rollout.id}/{rollout.group}/{rollout.model}/{rollout.version}"
        self.db.lock_table(conn, "rollout_log")
        (top,) = conn.execute("SELECT COALESCE(MAX(id), 0) FROM rollout_log").fetchone()
        conn.execute(
            "INSERT INTO rollout_log (id, rollout, at, decision, detail) VALUES (?, ?, ?, ?, ?)",
            (int(top) + 1, rollout.id, now, decision, detail),
        )
        conn.execute(
            "INSERT INTO events (device, kind, status, target, detail, at) VALUES (?, ?, ?, ?, ?, ?)",
            ("hub", "rollout", decision, target, detail[:1900], now),
        )

    def history(self, rid: int) -> list[tuple[float, str, str]]:
        rows = self.db.query(
            "SELECT at, decision, detail FROM rollout_log WHERE rollout = ? ORDER BY id", (rid,)
        )
        return [(float(a), str(d), str(t)) for a, d, t in rows]


def _rollout(row: Any) -> Rollout:
    (rid, group, model, version, previous, waves, criteria, state, wave, started, waived, baseline,
     reason, created, updated) = row  # fmt: skip
    return Rollout(
        int(rid), str(group), str(model), str(version), str(previous), list(json.loads(waves)),
        dict(json.loads(criteria)), str(state), int(wave), float(started), int(waived),
        dict(json.loads(baseline)), str(reason), float(created), float(updated),
    )  # fmt: skip


__all__ = ["ACTIVE", "Rollout", "RolloutStore"]
