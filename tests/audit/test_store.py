"""The SQLite audit store: group commit, durability, storage cap, upload bookkeeping, processes."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from agent.audit.store import AuditFull, AuditLog, audit_path
from fleet.chain import Entry
from fleet.device_key import ensure_device_key


def entry(i: int, action: str = "infer") -> Entry:
    return Entry(action, "gemma", "ok", "granted", {"uid": 1000, "user": "app"}, {"i": i, "tokens": 7})


def count_rows(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])


def test_concurrent_submitters_share_commits(tmp_path: Path) -> None:
    key = ensure_device_key(tmp_path)
    log = AuditLog(audit_path(tmp_path), key=key, checkpoint_every=500)
    log.start()
    seqs: list[int] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        futures = [log.submit(entry(t * 1000 + i)) for i in range(400)]
        got = [f.result() for f in futures]
        with lock:
            seqs.extend(got)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert sorted(seqs) == list(range(1, 2401))
    times = {s.record()["time"] for s in log.iter_records()}
    assert len(times) < 2400  # records of one commit share its timestamp: fsyncs were batched
    report = log.verify([key.public])
    assert report.ok and report.records == 2400
    assert log.checkpoints()[-1].seq == 2400


def test_append_returns_after_the_record_is_committed(tmp_path: Path) -> None:
    log = AuditLog(audit_path(tmp_path))
    log.start()

    async def run() -> list[int]:
        async def one(i: int) -> int:
            seq = await log.append(entry(i))
            with sqlite3.connect(audit_path(tmp_path)) as db:  # another connection sees it already
                assert db.execute("SELECT COUNT(*) FROM records WHERE seq = ?", (seq,)).fetchone()[0] == 1
            return seq

        return await asyncio.gather(*(one(i) for i in range(50)))

    seqs = asyncio.run(run())
    log.close()
    assert sorted(seqs) == list(range(1, 51))


def test_checkpoints_every_n_records_and_at_close(tmp_path: Path) -> None:
    key = ensure_device_key(tmp_path)
    log = AuditLog(audit_path(tmp_path), key=key, checkpoint_every=10)
    for i in range(35):
        log.record("infer", "m", "ok", "r", {"i": i})
    assert [c.seq for c in log.checkpoints()] == [10, 20, 30]
    log.close()
    assert [c.seq for c in log.checkpoints()] == [10, 20, 30, 35]


def test_checkpoint_after_interval(tmp_path: Path) -> None:
    key = ensure_device_key(tmp_path)
    now = [1000.0]
    log = AuditLog(
        audit_path(tmp_path), key=key, checkpoint_every=1000, checkpoint_interval_s=60, clock=lambda: now[0]
    )
    log.record("infer", "m", "ok", "r")
    assert log.checkpoints() == []
    now[0] += 61
    log.record("infer", "m", "ok", "r")
    assert [c.seq for c in log.checkpoints()] == [2]


def test_reopened_log_continues_the_chain(tmp_path: Path) -> None:
    key = ensure_device_key(tmp_path)
    first = AuditLog(audit_path(tmp_path), key=key)
    for i in range(5):
        first.record("infer", "m", "ok", "r", {"i": i})
    first.close()
    second = AuditLog(audit_path(tmp_path), key=key)
    assert second.stats().used_bytes == first.stats().used_bytes
    assert second.record("infer", "m", "ok", "r") == 6
    second.close()
    assert second.verify([key.public]).ok


def test_upload_bookkeeping(tmp_path: Path) -> None:
    log = AuditLog(audit_path(tmp_path))
    for i in range(10):
        log.record("infer", "m", "ok", "r", {"i": i})
    assert [s.seq for s in log.pending(4)] == [1, 2, 3, 4]
    assert log.backlog() == 10
    assert log.mark_uploaded(4) == 4
    assert [s.seq for s in log.pending(100)] == list(range(5, 11))
    assert log.mark_uploaded(2) == 4  # never goes back
    assert log.mark_uploaded(99) == 10  # never beyond the head
    assert log.backlog() == 0
    assert log.pending(5) == []


def test_pruning_uploaded_records_keeps_the_chain_verifiable(tmp_path: Path) -> None:
    key = ensure_device_key(tmp_path)
    log = AuditLog(audit_path(tmp_path), key=key, checkpoint_every=3)
    for i in range(10):
        log.record("infer", "m", "ok", "r", {"i": i})
    used = log.stats().used_bytes
    log.mark_uploaded(6)
    assert log.prune_uploaded() == 6
    assert log.stats().used_bytes < used
    assert log.anchor()[0] == 6
    assert [s.seq for s in log.iter_records()] == [7, 8, 9, 10]
    log.record("infer", "m", "ok", "after prune")
    report = log.verify([key.public])
    assert report.ok, report.problems
    assert (report.first_seq, report.last_seq) == (7, 11)


def fill(log: AuditLog) -> int:
    """Append until the log is at its cap; returns the head seq."""
    while log.stats().used_bytes < log.max_bytes:
        if log.record("infer", "m", "ok", "x" * 200) == 0:
            break  # record_gap mode: the record did not fit
    return log.stats().head_seq


def test_fail_closed_refuses_then_records_the_gap(tmp_path: Path) -> None:
    key = ensure_device_key(tmp_path)
    log = AuditLog(audit_path(tmp_path), key=key, max_bytes=20_000, on_full="fail_closed")
    written = fill(log)
    for _ in range(3):
        with pytest.raises(AuditFull) as err:
            log.admit()
        assert err.value.status == 503 and "audit log is full" in str(err.value)
    assert log.stats().refused == 3  # counted durably, not dropped silently
    log.mark_uploaded(written)
    log.prune_uploaded()
    log.admit()
    seq = log.record("infer", "m", "ok", "served again")
    gap, after = (s.record() for s in log.tail(2))
    assert (
        gap["action"] == "audit.gap" and gap["details"]["refused"] == 3 and gap["details"]["unrecorded"] == 0
    )
    assert after["seq"] == seq and after["reason"] == "served again"
    assert log.stats().refused == 0
    assert log.verify([key.public]).ok


def test_record_gap_mode_serves_and_counts(tmp_path: Path) -> None:
    log = AuditLog(audit_path(tmp_path), max_bytes=20_000, on_full="record_gap")
    written = fill(log)
    log.admit()  # never refuses
    assert [log.record("infer", "m", "ok", "unrecorded") for _ in range(4)] == [0, 0, 0, 0]
    assert log.stats().unrecorded == 4
    reopened = AuditLog(audit_path(tmp_path), max_bytes=20_000, on_full="record_gap")
    assert reopened.stats().unrecorded == 4  # survives a restart
    reopened.mark_uploaded(written)
    reopened.prune_uploaded()
    reopened.record("infer", "m", "ok", "recorded")
    gap = reopened.tail(2)[0].record()
    assert gap["action"] == "audit.gap" and gap["details"]["unrecorded"] == 4
    assert gap["details"]["since"] <= gap["details"]["until"]


def test_an_uploaded_log_prunes_itself_instead_of_filling(tmp_path: Path) -> None:
    log = AuditLog(audit_path(tmp_path), max_bytes=20_000)
    for _ in range(3):
        written = fill(log)
        log.mark_uploaded(log.stats().head_seq)
        log.record("infer", "m", "ok", "triggers pruning")
        assert written > 0
    assert log.stats().used_bytes < log.max_bytes
    assert log.verify([]).ok


def test_unserialisable_details_do_not_stop_the_writer(tmp_path: Path) -> None:
    log = AuditLog(audit_path(tmp_path))
    log.start()
    seq = log.submit(Entry("infer", "m", "ok", "r", {}, {"latency": float("inf"), "obj": object()})).result()
    assert log.submit(entry(1)).result() == seq + 1
    log.close()
    details = log.tail(2)[0].record()["details"]
    assert details["latency"] == "inf" and details["obj"].startswith("<object")


CHILD = """
import sys
from pathlib import Path
from agent.audit.store import AuditLog
log = AuditLog(Path(sys.argv[1]))
for i in range(int(sys.argv[2])):
    log.record("policy.change", "cli", "ok", "from another process", {"i": i})
"""


def test_another_process_appends_to_the_same_chain(tmp_path: Path) -> None:
    key = ensure_device_key(tmp_path)
    path = audit_path(tmp_path)
    log = AuditLog(path, key=key)
    log.start()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), "60"])
    futures = [log.submit(entry(i)) for i in range(300)]
    assert child.wait(timeout=120) == 0
    for f in futures:
        f.result()
    log.close()
    report = log.verify([key.public])
    assert report.ok, report.problems
    assert report.records == 360 == count_rows(path)
    actions = [json.loads(s.body)["action"] for s in log.iter_records()]
    assert actions.count("policy.change") == 60


def test_log_file_is_private(tmp_path: Path) -> None:
    log = AuditLog(audit_path(tmp_path))
    log.record("infer", "m", "ok", "r")
    assert audit_path(tmp_path).stat().st_mode & 0o777 == 0o600
    assert audit_path(tmp_path).parent.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"this is not a database" * 100, "file is not a database", id="garbage"),
        pytest.param(
            b"SQLite format 3\x00" + b"\xff" * 200, "cannot open the audit log", id="damaged-header"
        ),
    ],
)
def test_unusable_file_is_refused_at_open(tmp_path: Path, content: bytes, message: str) -> None:
    from agent.audit.store import AuditError

    path = audit_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with pytest.raises(AuditError, match=message):
        AuditLog(path)
    assert path.read_bytes() == content  # left as found, for whoever investigates
