"""The hub database on both engines: versioned migrations (from a SQLite file of an older hub to the
latest version, idempotent, a newer schema refused) and several writers of one device's audit
batches at once (exactly once, an unbroken chain, no lost update)."""

from __future__ import annotations

import itertools
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from fleet.chain import GENESIS, make_checkpoint, seal_all
from fleet.device_key import DeviceKey
from fleet.messages import AuditBatch
from hub.sync.db import db_target, describe
from hub.sync.migrations import LATEST, SchemaTooNew, migrate, open_database
from hub.sync.store import HubStore
from tests.sync.test_audit_sync import entries

# The schema of hubs before versioned migrations (no schema_version, no event ids, no rollouts).
OLD_SCHEMA = """
CREATE TABLE devices (device TEXT PRIMARY KEY, key TEXT, anchor_seq INTEGER NOT NULL DEFAULT 0,
    anchor_hash TEXT NOT NULL DEFAULT '', last_seq INTEGER NOT NULL DEFAULT 0,
    last_hash TEXT NOT NULL DEFAULT '', online INTEGER NOT NULL DEFAULT 0, state TEXT, seen REAL,
    problem TEXT);
CREATE TABLE audit (device TEXT NOT NULL, seq INTEGER NOT NULL, hash TEXT NOT NULL, body TEXT NOT NULL,
    time TEXT, received REAL NOT NULL, PRIMARY KEY (device, seq)) WITHOUT ROWID;
CREATE TABLE checkpoints (device TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
    signature TEXT NOT NULL, PRIMARY KEY (device, seq)) WITHOUT ROWID;
CREATE TABLE events (id INTEGER PRIMARY KEY, device TEXT NOT NULL, kind TEXT NOT NULL,
    status TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL, at REAL NOT NULL);
INSERT INTO devices (device, key, online, seen) VALUES ('dev-old', 'ab', 1, 5.0);
INSERT INTO events (device, kind, status, target, detail, at) VALUES ('dev-old', 'k', 's', 't', 'd', 1.0);
"""


def versions(store: HubStore) -> list[int]:
    return [int(v) for (v,) in store.db.query("SELECT version FROM schema_version ORDER BY version")]


@pytest.mark.parametrize(
    "old",
    [
        pytest.param("pre-versioning", id="hub-before-migrations"),
        pytest.param("empty", id="new-file"),
    ],
)
def test_sqlite_file_is_migrated_to_the_latest_version(tmp_path: Path, old: str) -> None:
    path = tmp_path / "hub.db"
    if old == "pre-versioning":
        with sqlite3.connect(path) as conn:
            conn.executescript(OLD_SCHEMA)
    store = HubStore(path)
    assert versions(store) == list(range(1, LATEST + 1))
    if old == "pre-versioning":
        # kept: the inventory, the events, the key pinned on first use (now registered)
        assert [r.device for r in store.devices()] == ["dev-old"]
        assert store.events("dev-old")[0][1].detail == "d"
        assert store.audit_keys("dev-old") == ["ab"]
    tables = {t for (t,) in store.db.query("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"rollouts", "rollout_devices", "rollout_log", "audit_keys", "schema_version"} <= tables
    store.close()
    again = open_database(path)
    assert migrate(again) == []  # idempotent
    again.close()


def test_migrations_apply_once_and_are_idempotent(hub_db: str | Path) -> None:
    store = HubStore(hub_db)
    assert versions(store) == list(range(1, LATEST + 1))
    assert migrate(store.db) == []
    store.close()
    store = HubStore(hub_db)
    assert versions(store) == list(range(1, LATEST + 1))
    store.close()


def test_a_schema_newer_than_the_code_is_refused(hub_db: str | Path) -> None:
    store = HubStore(hub_db)
    with store.db.tx() as tx:
        tx.execute(
            "INSERT INTO schema_version (version, name, applied) VALUES (?, ?, ?)", (LATEST + 1, "x", 0.0)
        )
    store.close()
    with pytest.raises(SchemaTooNew, match="upgrade edge-hub"):
        HubStore(hub_db)


@pytest.mark.parametrize(
    ("value", "env", "expected"),
    [
        pytest.param("x/hub.db", None, Path("x/hub.db"), id="path-option"),
        pytest.param(None, "postgresql://h/db", "postgresql://h/db", id="url-from-env"),
        pytest.param(None, None, Path("hub.db"), id="default-file"),
        pytest.param("postgres://u@h/db", "/y.db", "postgres://u@h/db", id="option-over-env"),
    ],
)
def test_the_database_setting(
    monkeypatch: pytest.MonkeyPatch, value: str | None, env: str | None, expected: str | Path
) -> None:
    if env is None:
        monkeypatch.delenv("EDGE_HUB_DB", raising=False)
    else:
        monkeypatch.setenv("EDGE_HUB_DB", env)
    assert db_target(value) == expected


def test_a_url_is_shown_without_its_password() -> None:
    assert describe("postgresql://hub:s3cret@db.example/hub") == "postgresql://hub:***@db.example/hub"


# --- several writers at once ----------------------------------------------------------------


def _batches(key: DeviceKey, rows: list, size: int) -> list[AuditBatch]:  # type: ignore[type-arg]
    n = len(rows)
    out = []
    for i in range(0, n, size):
        part = rows[i : i + size]
        cp = make_checkpoint(part[-1].seq, part[-1].hash, key.key_id, time.time(), key.sign)
        out.append(
            AuditBatch(
                "dev-a",
                tuple((r.seq, r.body, r.hash) for r in part),
                ((cp.seq, cp.body, cp.signature),),
                key.public.raw.hex(),
            )
        )
    return out


def _writer(target: str | Path, batches: list[AuditBatch], errors: list[str]) -> None:
    """One hub worker: stores its batches, re-sending one answered with a gap (as a device does
    when its batch overtook an earlier one handled by another worker)."""
    store = HubStore(target)
    try:
        for b in batches:
            for _ in range(2000):
                ack = store.store_audit("dev-a", b)
                if ack.status != "ok":
                    errors.append(f"{ack.status}: {ack.detail}")
                    return
                if ack.up_to_seq >= b.last_seq:
                    break
                time.sleep(0.002)
            else:
                errors.append(f"batch ending {b.last_seq} never stored")
    finally:
        store.close()


def _watch(target: str | Path, seen: list[int], done: threading.Event) -> None:
    store = HubStore(target)
    while not done.is_set():
        row = store.db.one("SELECT last_seq FROM devices WHERE device = ?", ("dev-a",))
        seen.append(int(row[0]) if row else 0)
    store.close()


@pytest.mark.parametrize(
    "split",
    [
        pytest.param("same-batches", id="both-writers-send-every-batch"),
        pytest.param("alternate", id="writers-split-the-batches"),
        pytest.param("overlapping", id="different-batch-boundaries"),
    ],
)
def test_two_concurrent_writers_of_one_device(hub_db: str | Path, split: str) -> None:
    key = DeviceKey.generate()
    HubStore(hub_db).register_key("dev-a", key.public.raw.hex())
    n = 1200
    rows = seal_all(entries(n), 0, GENESIS, time.time())
    if split == "same-batches":
        a = b = _batches(key, rows, 40)
    elif split == "alternate":
        every = _batches(key, rows, 40)
        a, b = every[0::2], every[1::2]
    else:
        a, b = _batches(key, rows, 40), _batches(key, rows, 70)
    errors: list[str] = []
    threads = [threading.Thread(target=_writer, args=(hub_db, part, errors)) for part in (a, b)]
    seen: list[int] = []
    watching = threading.Event()
    watcher = threading.Thread(target=_watch, args=(hub_db, seen, watching))
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    watching.set()
    watcher.join(30)
    assert errors == []
    # no lost update: the device's last stored seq never went back
    assert seen == sorted(seen), [x for x, y in itertools.pairwise(seen) if y < x][:5]
    store = HubStore(hub_db)
    assert store.audit_count("dev-a") == (n, n)
    assert store.verify_device("dev-a") == (n, [])
    assert store.devices()[0].audit_seq == n and store.devices()[0].problem is None


def test_a_writer_waits_for_the_device_row_held_by_another(pg_cluster: object) -> None:
    """PostgreSQL: extending a device's chain takes its row lock (SELECT ... FOR UPDATE), so a
    writer waits while another transaction holds the device's row, then goes on."""
    import psycopg

    url: str = pg_cluster.new_database()  # type: ignore[attr-defined]
    key = DeviceKey.generate()
    store = HubStore(url)
    store.register_key("dev-a", key.public.raw.hex())
    rows = seal_all(entries(20), 0, GENESIS, time.time())
    first, second = _batches(key, rows, 10)
    acks: list[int] = []
    with psycopg.connect(url) as holder:  # a transaction holding dev-a's row (another writer)
        holder.execute("SELECT last_seq FROM devices WHERE device = 'dev-a' FOR UPDATE")
        t = threading.Thread(target=lambda: acks.append(store.store_audit("dev-a", second).up_to_seq))
        t.start()
        waiting: list[tuple[object, ...]] = []
        for _ in range(3000):  # until the store's session is seen waiting on the lock
            waiting = holder.execute(
                "SELECT pid FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ).fetchall()
            if waiting:
                break
            time.sleep(0.01)
        assert waiting and acks == []
        # the other writer stores records 1..10 and commits: the waiting one goes on from 10
        # (had it read the row before the lock, it would answer a gap at 0)
        with holder.cursor() as cur:
            cur.executemany(
                "INSERT INTO audit (device, seq, hash, body, time, received) "
                "VALUES ('dev-a', %s, %s, %s, NULL, 0)",
                [(seq, h, b) for seq, b, h in first.rows],
            )
            cur.executemany(
                "INSERT INTO checkpoints (device, seq, body, signature) VALUES ('dev-a', %s, %s, %s)",
                list(first.checkpoints),
            )
        holder.execute(
            "UPDATE devices SET last_seq = 10, last_hash = %s, anchor_hash = %s WHERE device = 'dev-a'",
            (first.rows[-1][2], GENESIS),
        )
        holder.commit()
        t.join(30)
    assert acks == [20]
    assert store.verify_device("dev-a") == (20, [])
