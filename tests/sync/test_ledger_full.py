"""A full disk never lets a raw sqlite3 error out of the sync ledger, and never ends a sync round.

The disk is made full for real: ``PRAGMA max_page_count`` caps a real SQLite file at its current
size, so a write fails with SQLITE_FULL exactly as on a full partition (SQLite has then often rolled
back already). Every ledger write raises :class:`LedgerError`, leaves no transaction open, keeps
what was committed, and works again once there is room; the service's callers log and go on."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.sync.errors import LedgerError
from agent.sync.ledger import Failure, FailureBook, Ledger, UnneededBook
from agent.sync.outbox import Outbox
from agent.sync.reconcile import Activate
from fleet.messages import Event
from tests.fakes.engine import FakeBehaviour
from tests.sync.helpers import installed_blob, offline_service

DETAIL = "x" * 1900  # near the largest event detail


FILLERS = {
    "counters": "INSERT INTO counters (name, value) VALUES (?, 0)",
    "failures": "INSERT INTO failures VALUES (?, '1', 1, 0, 0, '', 'filler')",  # basis: no deployment
}


def make_full(ledger: Ledger) -> None:
    """Cap the file at its current page count, then fill the free space of the tables the writes
    under test use (ever smaller rows, so no page keeps room for a record)."""
    (pages,) = ledger.query("PRAGMA page_count")[0]
    ledger.conn.execute(f"PRAGMA max_page_count = {int(pages)}")
    i = 0
    for sql in FILLERS.values():
        size = 4096
        while size >= 1:
            i += 1
            try:
                ledger.conn.execute(sql, (f"filler-{i:06d}-" + "f" * size,))
            except sqlite3.OperationalError as exc:
                assert "full" in str(exc)
                size //= 2


def lift_cap(ledger: Ledger) -> None:
    ledger.conn.execute("PRAGMA max_page_count = 1073741823")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = Ledger.open(tmp_path)
    yield led
    led.close()


WRITES: list[object] = [
    pytest.param(
        lambda led: [
            Outbox(led).append(Event("deployment", "activated", "t", DETAIL, 1.0)) for _ in range(5)
        ],
        id="outbox-append",
    ),
    pytest.param(
        lambda led: FailureBook(led).put(Failure("m", "1", 1, 1.0, 2.0, "e" * 9000, "B")), id="failures-put"
    ),
    pytest.param(
        lambda led: UnneededBook(led).replace({(f"model-{i}-{'v' * 200}", "1"): 1.0 for i in range(2000)}),
        id="unneeded-replace",
    ),
]


@pytest.mark.parametrize("write", WRITES)
def test_a_write_on_a_full_disk_is_a_ledger_error(ledger: Ledger, write: Callable[[Ledger], object]) -> None:
    kept = Outbox(ledger).append(Event("deployment", "activated", "models/m/1", "before", 1.0))
    make_full(ledger)
    with pytest.raises(LedgerError, match="full"):
        write(ledger)
    assert not ledger.conn.in_transaction
    assert Outbox(ledger).pending()[0].id == kept.id  # committed rows intact, all readable
    lift_cap(ledger)
    write(ledger)  # room again: the same connection works


def test_an_error_inside_a_transaction_is_rolled_back_and_wrapped(ledger: Ledger) -> None:
    with pytest.raises(LedgerError, match="no such table"), ledger.tx() as conn:
        conn.execute("INSERT INTO counters (name, value) VALUES ('c', 1)")
        conn.execute("SELECT * FROM no_such_table")
    assert not ledger.conn.in_transaction
    assert ledger.counter("c") == 0


def test_a_failed_commit_is_rolled_back_and_wrapped(ledger: Ledger) -> None:
    """A deferred foreign key fails only at COMMIT: the transaction must not stay open."""
    ledger.conn.execute("PRAGMA foreign_keys = ON")
    ledger.conn.executescript(
        "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
        "CREATE TABLE child (pid INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);"
    )
    with pytest.raises(LedgerError, match="FOREIGN KEY"), ledger.tx() as conn:
        conn.execute("INSERT INTO child (pid) VALUES (42)")
    assert not ledger.conn.in_transaction
    assert ledger.query("SELECT COUNT(*) FROM child") == [(0,)]
    Outbox(ledger).append(Event("deployment", "activated", "t", "after", 1.0))  # usable again


# --- the service's callers --------------------------------------------------------------------


async def test_service_goes_on_when_the_ledger_is_full(
    tmp_path: Path, certdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sync = offline_service(tmp_path, certdir, {"bad": FakeBehaviour(fail_load=True)})
    try:
        sync.failures.put(Failure("gone", "1", 1, 1.0, 2.0, "old", sync._basis))  # stale: cleared
        make_full(sync.ledger)
        for _ in range(5):  # more than the outbox's last page holds: logged, not raised
            await sync.report(Event("deployment", "activated", "t", DETAIL))
        ok = installed_blob(sync, b"good weights", "good")
        await sync._activate(Activate("good", "1", True), ok, "models/good/1")  # clear fails: logged
        bad = installed_blob(sync, b"bad weights", "bad")
        await sync._activate(Activate("bad", "1", True), bad, "models/bad/1")  # put fails: logged
        await sync.reconcile()  # stale clear fails: logged, the round goes on
        sync._record_unneeded({(f"m{i}-{'v' * 200}", "1"): 1.0 for i in range(2000)})
        assert "bad" not in sync.failures.all()  # its failure could not be recorded: logged
        logged = capsys.readouterr().out
        assert "sync_event_not_persisted" in logged and "what=failures.put" in logged
        assert sync.pool.default_id == "good"  # "bad" failed, the previous model serves
        assert not sync.ledger.conn.in_transaction
        persisted = len(sync.outbox)
        assert persisted < 5 + 2  # some events could not be persisted; none is half-written
        lift_cap(sync.ledger)
        await sync.report(Event("deployment", "activated", "t", "after"))
        assert len(sync.outbox) == persisted + 1
        assert sync.outbox.pending(persisted + 1)[-1].detail == "after"
    finally:
        await sync.pool.close()  # type: ignore[attr-defined]
        sync.ledger.close()


def test_raw_sqlite_errors_are_not_sqlite_errors_any_more(ledger: Ledger) -> None:
    """The reviewer's loop (/tmp/rv/full.py): append until full, then once more."""
    box = Outbox(ledger, 100_000)
    (pages,) = ledger.query("PRAGMA page_count")[0]
    ledger.conn.execute(f"PRAGMA max_page_count = {int(pages)}")
    with pytest.raises(LedgerError):
        for i in range(2000):
            box.append(Event("deployment", "activated", "t", "x" * 1500, float(i)))
    try:
        box.append(Event("deployment", "activated", "t", "y", 1.0))
    except sqlite3.Error as exc:  # pragma: no cover - the defect
        pytest.fail(f"raw sqlite3 error escaped: {exc!r}")
    except LedgerError:
        pass
    assert not ledger.conn.in_transaction
