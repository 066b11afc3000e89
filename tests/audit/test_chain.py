"""Properties of the hash chain (pure): sealed logs verify; any single cut, swap or edit is named."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from fleet.chain import (
    GENESIS,
    Entry,
    Sealed,
    canonical,
    make_checkpoint,
    record_hash,
    seal_all,
    verify,
)
from fleet.device_key import DeviceKey

KEY = DeviceKey.generate()

entries = st.lists(
    st.builds(
        Entry,
        action=st.sampled_from(["infer", "embed", "models.list", "policy.change"]),
        resource=st.one_of(st.none(), st.text(max_size=12)),
        outcome=st.sampled_from(["ok", "denied", "error"]),
        reason=st.text(max_size=30),
        actor=st.fixed_dictionaries({"uid": st.integers(0, 70000), "user": st.text(max_size=8)}),
        details=st.dictionaries(
            st.text(min_size=1, max_size=6),
            st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=6)),
        ),
    ),
    min_size=3,
    max_size=25,
)


def sealed(items: list[Entry]) -> list[Sealed]:
    return seal_all(items, 0, GENESIS, 1_800_000_000.0)


@given(entries)
def test_sealed_log_verifies(items: list[Entry]) -> None:
    rows = sealed(items)
    cp = make_checkpoint(rows[-1].seq, rows[-1].hash, KEY.key_id, 0.0, KEY.sign)
    report = verify(rows, [cp], [KEY.public])
    assert report.ok, report.problems
    assert (report.records, report.last_seq, report.last_hash) == (len(items), len(items), rows[-1].hash)


@given(entries, st.data())
def test_removing_any_record_is_named(items: list[Entry], data: st.DataObject) -> None:
    rows = sealed(items)
    i = data.draw(st.integers(0, len(rows) - 2))  # the last one is covered by `truncated`
    report = verify(rows[:i] + rows[i + 1 :], [], [])
    first = report.first_problem
    assert first is not None and first.kind == "removed" and first.seq == i + 1


@given(entries, st.data())
def test_swapping_neighbours_is_named(items: list[Entry], data: st.DataObject) -> None:
    rows = sealed(items)
    i = data.draw(st.integers(0, len(rows) - 2))
    a, b = rows[i], rows[i + 1]
    swapped = [*rows[:i], Sealed(a.seq, b.body, b.hash), Sealed(b.seq, a.body, a.hash), *rows[i + 2 :]]
    first = verify(swapped, [], []).first_problem
    assert first is not None and first.kind == "reordered" and first.seq == i + 1


@settings(max_examples=50)
@given(entries, st.data())
def test_editing_any_record_is_named(items: list[Entry], data: st.DataObject) -> None:
    rows = sealed(items)
    i = data.draw(st.integers(0, len(rows) - 1))
    rehash = data.draw(st.booleans())
    record = json.loads(rows[i].body)
    record["reason"] = record["reason"] + "!"
    body = canonical(record)
    edited = Sealed(rows[i].seq, body, record_hash(body) if rehash else rows[i].hash)
    tampered = [*rows[:i], edited, *rows[i + 1 :]]
    cp = make_checkpoint(rows[-1].seq, rows[-1].hash, KEY.key_id, 0.0, KEY.sign)
    first = verify(tampered, [cp], [KEY.public]).first_problem
    assert first is not None
    if not rehash:
        assert (first.kind, first.seq) == ("altered", i + 1)
    elif i < len(rows) - 1:
        assert (first.kind, first.seq) == ("broken_link", i + 2)
    else:
        assert (first.kind, first.seq) == ("rewritten", i + 1)


def test_chain_resumes_from_anchor_after_pruning() -> None:
    rows = sealed([Entry("infer", "m", "ok", "r") for _ in range(10)])
    kept = rows[4:]
    assert verify(kept, [], [], anchor=(4, rows[3].hash)).ok
    wrong = verify(kept, [], [], anchor=(4, GENESIS)).first_problem
    assert wrong is not None and wrong.kind == "broken_link" and wrong.seq == 5


def test_checkpoint_without_key_is_unverifiable() -> None:
    rows = sealed([Entry("infer", "m", "ok", "r") for _ in range(3)])
    cp = make_checkpoint(3, rows[-1].hash, KEY.key_id, 0.0, KEY.sign)
    first = verify(rows, [cp], []).first_problem
    assert first is not None and first.kind == "unverifiable_checkpoint"
