"""The hub workers' registry (table ``hub_workers``): which ``edge-hub serve`` workers serve, last
seen when; and the rule for when the leader may declare one gone.

Every role-``all`` worker writes its row (client id, host, pid, its wall-clock time) at start and
at every leader check; a worker that stops cleanly deletes its row after its broker session ended.
A row not renewed for ``stale_s`` names a worker gone without leaving (kill -9, host lost, frozen):
its persistent broker session still receives its share of the shared subscriptions (Mosquitto
keeps routing a share to an offline session until the session expires), so the leader takes the
session over and ends it (hub/sync/rescue.py).

Invariants:
- A row is declared stale only by an observer that has itself written its own row without a gap
  longer than ``stale_s / 2`` for at least ``stale_s`` (:class:`Watch`): after a database outage
  or the observer's own freeze, every live worker gets ``stale_s`` to write again before anyone is
  declared gone. (A worker that becomes the leader has been writing its row all along as one of
  the others, so it may judge at once.)
- :meth:`WorkerRegistry.gone` with ``before`` deletes the row only if it is still older than
  ``before``: a worker that came back while its session was taken over keeps its row.
- Times are each worker's wall clock (``time.time()``): worker hosts keep NTP time, and the 15 s
  default of ``stale_s`` is far above the skew NTP leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

from hub.sync.db import Database


class WorkerRegistry:
    """Rows of ``hub_workers`` (the schema is migration 4, hub/sync/migrations.py)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def seen(self, client_id: str, host: str, pid: int, now: float) -> None:
        """Record ``client_id`` alive at ``now`` (insert or renew)."""
        with self.db.tx() as tx:
            tx.execute(
                "INSERT INTO hub_workers (client_id, host, pid, seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (client_id) DO UPDATE SET host = excluded.host, pid = excluded.pid, "
                "seen = excluded.seen",
                (client_id, host, pid, now),
            )

    def stale(self, before: float) -> list[tuple[str, str, int, float]]:
        """Workers last seen before ``before``: (client id, host, pid, seen), oldest first."""
        rows = self.db.query(
            "SELECT client_id, host, pid, seen FROM hub_workers WHERE seen < ? ORDER BY seen", (before,)
        )
        return [(str(c), str(h), int(p), float(s)) for c, h, p, s in rows]

    def all(self) -> list[tuple[str, str, int, float]]:
        rows = self.db.query("SELECT client_id, host, pid, seen FROM hub_workers ORDER BY client_id", ())
        return [(str(c), str(h), int(p), float(s)) for c, h, p, s in rows]

    def gone(self, client_id: str, before: float | None = None) -> bool:
        """Delete the row of ``client_id`` (only if last seen before ``before``, when given)."""
        with self.db.tx() as tx:
            if before is None:
                cur = tx.execute("DELETE FROM hub_workers WHERE client_id = ?", (client_id,))
            else:
                cur = tx.execute(
                    "DELETE FROM hub_workers WHERE client_id = ? AND seen < ?", (client_id, before)
                )
            return cur.rowcount > 0


@dataclass
class Watch:
    """Whether this observer has watched the registry long enough, without a gap, to call a row
    stale (module docstring). Pure: the caller passes its clock."""

    stale_s: float
    since: float | None = None
    last: float | None = None

    def wrote(self, now: float) -> None:
        """This observer's own row was written at ``now``."""
        if self.last is None or now - self.last > self.stale_s / 2:
            self.since = now
        self.last = now

    def failed(self) -> None:
        """A write of its own row failed (database unavailable): the watch starts again."""
        self.since = self.last = None

    def may_judge(self, now: float) -> bool:
        return self.since is not None and now - self.since >= self.stale_s


__all__ = ["Watch", "WorkerRegistry"]
