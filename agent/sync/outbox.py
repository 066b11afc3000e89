"""The persistent event outbox: events wait here until the hub acknowledged storing them.

Stored in the sync ledger (:mod:`agent.sync.ledger`), oldest first.

Invariants:
- :meth:`Outbox.append` commits the event (fsynced) before it returns: an event reported while
  the broker is unreachable survives a restart or a ``kill -9``; a torn event is never read back
  (SQLite transactions are atomic).
- Every event gets an ``id`` unique to this device when appended; the same event is re-sent
  with the same id until the hub acknowledged it, and the hub stores each id once
  (delivery at least once, stored exactly once).
- An event leaves the outbox only through :meth:`Outbox.acked`, which the sync service calls when
  the hub's application-level acknowledgement (``devices/<id>/events/ack``) names it, never on the
  broker's PUBACK: the broker having an event is not the hub having stored it (one transaction for
  a burst of acknowledged ids).
- Every method may be called from any thread (the ledger serializes them); the service calls the
  fsyncing ones from a worker thread, never on the event loop.
- At most ``capacity`` events are held: appending to a full outbox drops the oldest and adds it
  to :attr:`Outbox.dropped` (persisted, never reset).
"""

from __future__ import annotations

import dataclasses
import uuid

from agent.sync.errors import LedgerError
from agent.sync.ledger import Ledger
from fleet.errors import ProtocolError
from fleet.messages import Event

DEFAULT_CAPACITY = 10_000


class Outbox:
    """Events not yet acknowledged by the hub."""

    def __init__(self, ledger: Ledger, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"outbox capacity must be at least 1, got {capacity}")
        self.ledger = ledger
        self.capacity = capacity

    def append(self, event: Event) -> Event:
        """Persist ``event`` (given an id if it has none); return it as stored."""
        if not event.id:
            event = dataclasses.replace(event, id=uuid.uuid4().hex)
        with self.ledger.tx() as conn:
            conn.execute("INSERT OR IGNORE INTO outbox (id, body) VALUES (?, ?)", (event.id, event.encode()))
            (count,) = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
            over = int(count) - self.capacity
            if over > 0:
                conn.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)", (over,)
                )
                conn.execute(
                    "INSERT INTO counters (name, value) VALUES ('dropped', ?)"
                    " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    (over,),
                )
        return event

    def pending(self, limit: int = 100) -> list[Event]:
        """The oldest ``limit`` events, oldest first."""
        out = []
        for (body,) in self.ledger.query("SELECT body FROM outbox ORDER BY seq LIMIT ?", (limit,)):
            try:
                out.append(Event.decode(bytes(body)))
            except ProtocolError as exc:  # only a hand-edited ledger gets here
                raise LedgerError(f"outbox holds a malformed event: {exc}") from None
        return out

    def acked(self, *event_ids: str) -> None:
        """The hub acknowledged ``event_ids``: forget them (one transaction, none if empty)."""
        if not event_ids:
            return
        with self.ledger.tx() as conn:
            conn.executemany("DELETE FROM outbox WHERE id = ?", [(i,) for i in event_ids])

    def __len__(self) -> int:
        (count,) = self.ledger.query("SELECT COUNT(*) FROM outbox")[0]
        return int(count)

    @property
    def dropped(self) -> int:
        return self.ledger.counter("dropped")


__all__ = ["DEFAULT_CAPACITY", "Outbox"]
