"""`edge-agent audit verify` against real log files tampered with in named ways."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.audit.store import AuditLog, audit_path
from agent.cli import main
from fleet.chain import CHECKPOINT_DOMAIN, canonical, record_hash
from fleet.device_key import DeviceKey, ensure_device_key

RECORDS = 20
CHECKPOINT_EVERY = 5

Tamper = Callable[[sqlite3.Connection], None]


def make_log(state_dir: Path) -> Path:
    key = ensure_device_key(state_dir)
    log = AuditLog(audit_path(state_dir), key=key, checkpoint_every=CHECKPOINT_EVERY)
    for i in range(RECORDS):
        log.record("infer", f"model-{i % 3}", "ok", "granted", {"i": i, "completion_tokens": i})
    log.close()
    return audit_path(state_dir)


def rows(db: sqlite3.Connection) -> dict[int, tuple[str, str]]:
    return {s: (b, h) for s, b, h in db.execute("SELECT seq, body, hash FROM records ORDER BY seq")}


def edit_body(
    db: sqlite3.Connection, seq: int, change: Callable[[dict[str, object]], None], rehash: bool
) -> None:
    body, hash_ = rows(db)[seq]
    record = json.loads(body)
    change(record)
    new_body = canonical(record)
    db.execute(
        "UPDATE records SET body = ?, hash = ? WHERE seq = ?",
        (new_body, record_hash(new_body) if rehash else hash_, seq),
    )


def set_outcome(record: dict[str, object]) -> None:
    record["outcome"] = "denied"


def altered(db: sqlite3.Connection) -> None:
    edit_body(db, 7, set_outcome, rehash=False)


def altered_and_rehashed(db: sqlite3.Connection) -> None:
    edit_body(db, 7, set_outcome, rehash=True)


def last_rewritten(db: sqlite3.Connection) -> None:
    edit_body(db, RECORDS, set_outcome, rehash=True)


def rewrite_chain_from(db: sqlite3.Connection, first: int) -> None:
    """What an attacker with write access would do: change a record and re-link all that follow."""
    current = rows(db)
    prev = current[first - 1][1]
    for seq in range(first, RECORDS + 1):
        record = json.loads(current[seq][0])
        record["prev"] = prev
        if seq == first:
            record["outcome"] = "denied"
        body = canonical(record)
        prev = record_hash(body)
        db.execute("UPDATE records SET body = ?, hash = ? WHERE seq = ?", (body, prev, seq))


def chain_rewritten(db: sqlite3.Connection) -> None:
    rewrite_chain_from(db, 7)


def swapped(db: sqlite3.Connection) -> None:
    current = rows(db)
    for seq, other in ((7, 8), (8, 7)):
        db.execute("UPDATE records SET body = ?, hash = ? WHERE seq = ?", (*current[other], seq))


def removed(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM records WHERE seq = 7")


def removed_and_renumbered(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM records WHERE seq = 7")
    for seq in range(8, RECORDS + 1):
        db.execute("UPDATE records SET seq = ? WHERE seq = ?", (seq - 1, seq))


def truncated(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM records WHERE seq > 17")


def malformed(db: sqlite3.Connection) -> None:
    db.execute("UPDATE records SET body = 'not json', hash = ? WHERE seq = 7", (record_hash("not json"),))


def checkpoint_hash_changed(db: sqlite3.Connection) -> None:
    seq, body = db.execute("SELECT seq, body FROM checkpoints WHERE seq = 10").fetchone()
    fields = json.loads(body)
    fields["hash"] = "0" * 64
    db.execute("UPDATE checkpoints SET body = ? WHERE seq = ?", (canonical(fields), seq))


def checkpoint_by_other_key(db: sqlite3.Connection) -> None:
    """The attacker rewrites the chain and signs fresh checkpoints with a key of their own."""
    rewrite_chain_from(db, 7)
    other = DeviceKey.generate()
    current = rows(db)
    db.execute("DELETE FROM checkpoints")
    for seq in (10, 15, 20):
        body = canonical({"seq": seq, "hash": current[seq][1], "key_id": other.key_id, "time": "x"})
        signature = other.sign(CHECKPOINT_DOMAIN + body.encode()).hex()
        db.execute("INSERT INTO checkpoints VALUES (?, ?, ?)", (seq, body, signature))


def checkpoint_claims_device_key(db: sqlite3.Connection) -> None:
    """As above, but the forged checkpoints claim the device's key id."""
    rewrite_chain_from(db, 7)
    other = DeviceKey.generate()
    current = rows(db)
    device_key_id = json.loads(db.execute("SELECT body FROM checkpoints LIMIT 1").fetchone()[0])["key_id"]
    db.execute("DELETE FROM checkpoints")
    body = canonical({"seq": 20, "hash": current[20][1], "key_id": device_key_id, "time": "x"})
    db.execute(
        "INSERT INTO checkpoints VALUES (?, ?, ?)",
        (20, body, other.sign(CHECKPOINT_DOMAIN + body.encode()).hex()),
    )


def checkpoint_signature_garbage(db: sqlite3.Connection) -> None:
    db.execute("UPDATE checkpoints SET signature = 'zz' WHERE seq = 5")


def checkpoint_moved(db: sqlite3.Connection) -> None:
    db.execute("UPDATE checkpoints SET seq = 12 WHERE seq = 10")


@pytest.mark.parametrize(
    ("tamper", "kind", "message"),
    [
        pytest.param(altered, "altered", "record 7 does not match its hash", id="record-altered"),
        pytest.param(
            altered_and_rehashed,
            "broken_link",
            "broken link between record 7 and record 8",
            id="record-altered-and-rehashed",
        ),
        pytest.param(
            last_rewritten, "rewritten", "record 20 differs from its signed checkpoint", id="last-rewritten"
        ),
        pytest.param(
            chain_rewritten, "rewritten", "record 10 differs from its signed checkpoint", id="chain-relinked"
        ),
        pytest.param(swapped, "reordered", "position 7 holds record 8", id="records-swapped"),
        pytest.param(removed, "removed", "record 7 is missing", id="record-removed"),
        pytest.param(
            removed_and_renumbered, "removed", "record 7 is missing", id="record-removed-and-later-renumbered"
        ),
        pytest.param(truncated, "truncated", "records 18..20 are missing", id="tail-truncated"),
        pytest.param(malformed, "malformed", "record 7 is not a well-formed record", id="record-malformed"),
        pytest.param(
            checkpoint_hash_changed,
            "forged_checkpoint",
            "checkpoint at record 10 has an invalid signature",
            id="checkpoint-edited",
        ),
        pytest.param(
            checkpoint_by_other_key,
            "forged_checkpoint",
            "signed by unknown key",
            id="checkpoints-by-another-key",
        ),
        pytest.param(
            checkpoint_claims_device_key,
            "forged_checkpoint",
            "checkpoint at record 20 has an invalid signature",
            id="checkpoint-claims-device-key",
        ),
        pytest.param(
            checkpoint_signature_garbage,
            "forged_checkpoint",
            "checkpoint at record 5 is malformed",
            id="checkpoint-signature-garbage",
        ),
        pytest.param(checkpoint_moved, "forged_checkpoint", "names another seq", id="checkpoint-moved"),
    ],
)
def test_verify_names_the_first_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: Tamper, kind: str, message: str
) -> None:
    path = make_log(tmp_path)
    assert main(["--state-dir", str(tmp_path), "audit", "verify"]) == 0
    capsys.readouterr()
    with sqlite3.connect(path) as db:
        tamper(db)
    assert main(["--state-dir", str(tmp_path), "audit", "verify", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    first = report["problems"][0]
    assert first["kind"] == kind
    assert message in first["message"]
    assert main(["--state-dir", str(tmp_path), "audit", "verify"]) == 1
    assert f"audit log BROKEN: {first['message']}" in capsys.readouterr().err


def test_intact_log_verifies_with_the_hub_copy_of_the_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_log(tmp_path)
    pub = tmp_path / "keys" / "device_ed25519.pub"
    hub_copy = tmp_path / "hub.pub"
    hub_copy.write_text(pub.read_text())
    assert main(["--state-dir", str(tmp_path), "audit", "verify", "--public-key", str(hub_copy)]) == 0
    out = capsys.readouterr().out
    assert (
        f"records 1..{RECORDS} ({RECORDS})" in out
        and f"{RECORDS // CHECKPOINT_EVERY} signed checkpoint(s)" in out
    )
    hub_copy.write_text(DeviceKey.generate().public.raw.hex())
    assert main(["--state-dir", str(tmp_path), "audit", "verify", "--public-key", str(hub_copy)]) == 1
    assert "signed by unknown key" in capsys.readouterr().err
