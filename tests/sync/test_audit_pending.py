"""Audit batches that arrive ahead of their predecessor (several hub workers split a device's
batches in flight): held as pending, verified on their own, promoted when the gap closes, the
acknowledgement naming the highest contiguous seq; on both engines."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fleet.chain import GENESIS, Sealed, seal_all
from fleet.device_key import DeviceKey
from fleet.messages import AuditBatch
from hub.sync.store import MAX_PENDING, HubStore
from tests.sync.test_audit_sync import _tampered, batch_of, entries, new_store


def _pending(store: HubStore) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in store.db.query("SELECT first_seq, last_seq FROM audit_pending")]


@pytest.mark.parametrize(
    ("order", "acks"),
    [
        pytest.param([1, 0, 2, 3], [0, 20, 30, 40], id="second-overtakes-first"),
        pytest.param([3, 2, 1, 0], [0, 0, 0, 40], id="all-reversed"),
        pytest.param([0, 2, 3, 1], [10, 10, 10, 40], id="third-and-fourth-overtake-second"),
        pytest.param([1, 1, 0, 3, 2], [0, 0, 20, 20, 40], id="a-held-batch-redelivered"),
    ],
)
def test_batches_ahead_of_their_predecessor_are_held_then_promoted(
    hub_db: str | Path, order: list[int], acks: list[int]
) -> None:
    key = DeviceKey.generate()
    rows = seal_all(entries(40), 0, GENESIS, time.time())
    batches = [batch_of(key, rows[i : i + 10]) for i in range(0, 40, 10)]
    store = new_store(hub_db, key)
    got = [store.store_audit("dev-a", batches[i]) for i in order]
    assert [a.up_to_seq for a in got] == acks
    assert all(a.status == "ok" for a in got)
    assert store.audit_count("dev-a") == (40, 40)
    assert store.verify_device("dev-a") == (40, [])
    assert _pending(store) == []


def test_a_held_batch_with_other_boundaries_links_by_hash(hub_db: str | Path) -> None:
    """Re-sent after a partial ack, batches start elsewhere: a held 15..30 joins a chain at 20."""
    key = DeviceKey.generate()
    rows = seal_all(entries(30), 0, GENESIS, time.time())
    store = new_store(hub_db, key)
    assert store.store_audit("dev-a", batch_of(key, rows[14:])).up_to_seq == 0
    assert _pending(store) == [(15, 30)]
    assert store.store_audit("dev-a", batch_of(key, rows[:20])).up_to_seq == 30
    assert store.audit_count("dev-a") == (30, 30)
    assert store.verify_device("dev-a") == (30, [])


@pytest.mark.parametrize(
    ("case", "status"),
    [
        pytest.param("altered-body-keeps-old-hash", "chain_broken", id="altered"),
        pytest.param("rehashed-but-chain-broken", "chain_broken", id="broken-link"),
        pytest.param("unsigned", "unsigned", id="no-checkpoint-at-its-last-record"),
        pytest.param("other-key", "chain_broken", id="signed-by-another-key"),
    ],
)
def test_a_bad_batch_ahead_is_refused_and_not_held(hub_db: str | Path, case: str, status: str) -> None:
    key = DeviceKey.generate()
    rows = seal_all(entries(20), 0, GENESIS, time.time())
    store = new_store(hub_db, key)
    ahead = rows[10:]
    if case == "unsigned":
        batch = batch_of(key, ahead, sign=False)
    elif case == "other-key":
        other = DeviceKey.generate()
        good = batch_of(other, ahead)
        batch = AuditBatch("dev-a", good.rows, good.checkpoints, key.public.raw.hex())
    elif case.startswith("altered"):
        r = ahead[3]
        altered = Sealed(r.seq, r.body.replace("allow", "deny"), r.hash)
        batch = batch_of(key, [*ahead[:3], altered, *ahead[4:]])
    else:  # rehashed: the next record's prev no longer names it
        batch = batch_of(key, _tampered(ahead, 3, outcome="deny"))
    ack = store.store_audit("dev-a", batch)
    assert (ack.status, ack.up_to_seq) == (status, 0)
    assert _pending(store) == []
    assert store.store_audit("dev-a", batch_of(key, rows[:10])).up_to_seq == 10
    assert store.audit_count("dev-a") == (10, 10)


def test_a_held_batch_of_another_chain_is_dropped_when_the_gap_closes(hub_db: str | Path) -> None:
    """Signed by the device but not the chain the hub holds (e.g. a recreated log): the records
    that close the gap are stored, the held batch is not, and the true successor is accepted."""
    key = DeviceKey.generate()
    rows = seal_all(entries(20), 0, GENESIS, time.time())
    other = seal_all(entries(20, start=100), 0, GENESIS, time.time())
    store = new_store(hub_db, key)
    assert store.store_audit("dev-a", batch_of(key, other[10:])).up_to_seq == 0
    assert store.store_audit("dev-a", batch_of(key, rows[:10])).up_to_seq == 10
    assert _pending(store) == []
    assert store.store_audit("dev-a", batch_of(key, rows[10:])).up_to_seq == 20
    assert store.verify_device("dev-a") == (20, [])


def test_at_most_max_pending_batches_are_held_per_device(hub_db: str | Path) -> None:
    key = DeviceKey.generate()
    n = 2 * (MAX_PENDING + 2)
    rows = seal_all(entries(n), 0, GENESIS, time.time())
    store = new_store(hub_db, key)
    acks = [store.store_audit("dev-a", batch_of(key, rows[i : i + 2])) for i in range(2, n, 2)]
    assert [a.detail.endswith("held") for a in acks] == [True] * MAX_PENDING + [False]
    assert len(_pending(store)) == MAX_PENDING
    # the gap closes: the held batches join, the one refused for the limit is sent again
    assert store.store_audit("dev-a", batch_of(key, rows[:2])).up_to_seq == n - 2
    assert store.store_audit("dev-a", batch_of(key, rows[n - 2 :])).up_to_seq == n
    assert store.verify_device("dev-a") == (n, [])
