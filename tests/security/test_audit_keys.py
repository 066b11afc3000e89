"""The hub trusts only registered audit keys and stores only signed batches (issue 15, medium #7).

Before: the hub pinned a device's key on first use, a batch without a key skipped the comparison,
and a batch without a checkpoint was stored on hash links alone. Now the operator registers the key
(``edge-hub device register``, from what ``edge-agent enroll`` prints) and every batch that brings
new records must carry a checkpoint at its last record signed by that key.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.audit import Entry
from fleet.chain import GENESIS, Sealed, make_checkpoint, seal_all
from fleet.device_key import DeviceKey
from fleet.messages import AuditBatch
from hub.cli import main as hub_main
from hub.sync.store import HubStore
from tests.sync.helpers import new_repo

KEY = DeviceKey.generate()
OTHER = DeviceKey.generate()
ROWS = seal_all(
    [Entry("request", f"m/{i}", "allow", "t", {"uid": 1}, {"i": i}) for i in range(20)],
    0,
    GENESIS,
    time.time(),
)


def cp(key: DeviceKey, row: Sealed, key_id: str | None = None) -> tuple[int, str, str]:
    c = make_checkpoint(row.seq, row.hash, key_id or key.key_id, time.time(), key.sign)
    return (c.seq, c.body, c.signature)


def batch(rows: list[Sealed], cps: tuple[tuple[int, str, str], ...], key_hex: str) -> AuditBatch:
    return AuditBatch("dev-a", tuple((r.seq, r.body, r.hash) for r in rows), cps, key_hex)


K = KEY.public.raw.hex()
CASES = [
    pytest.param(False, batch(ROWS, (cp(KEY, ROWS[-1]),), K), "key_not_registered", id="no-key-registered"),
    pytest.param(True, batch(ROWS, (), K), "unsigned", id="no-checkpoint"),
    pytest.param(
        True, batch(ROWS, (cp(KEY, ROWS[9]),), K), "unsigned", id="checkpoint-not-at-the-last-record"
    ),
    pytest.param(
        True, batch(ROWS, (cp(OTHER, ROWS[-1], KEY.key_id),), K), "chain_broken", id="signed-by-another-key"
    ),
    pytest.param(True, batch(ROWS, (cp(KEY, ROWS[-1]),), ""), "chain_broken", id="batch-without-key"),
    pytest.param(
        True,
        batch(ROWS, (cp(OTHER, ROWS[-1]),), OTHER.public.raw.hex()),
        "chain_broken",
        id="another-key-self-signed",
    ),
    pytest.param(True, batch(ROWS, (cp(KEY, ROWS[-1]),), K), "ok", id="registered-and-signed"),
]


@pytest.mark.parametrize(("register", "sent", "status"), CASES)
def test_what_the_hub_stores(tmp_path: Path, register: bool, sent: AuditBatch, status: str) -> None:
    store = HubStore(tmp_path / "hub.db")
    if register:
        store.register_key("dev-a", K)
    ack = store.store_audit("dev-a", sent)
    assert ack.status == status, ack.detail
    assert store.audit_count("dev-a")[0] == (20 if status == "ok" else 0)


def test_a_rotated_key_is_registered_and_old_checkpoints_still_verify(tmp_path: Path) -> None:
    store = HubStore(tmp_path / "hub.db")
    store.register_key("dev-a", K)
    assert store.store_audit("dev-a", batch(ROWS[:10], (cp(KEY, ROWS[9]),), K)).status == "ok"
    new = DeviceKey.generate()
    assert (
        store.store_audit("dev-a", batch(ROWS[10:], (cp(new, ROWS[-1]),), new.public.raw.hex())).status
        != "ok"
    )
    store.register_key("dev-a", new.public.raw.hex(), now=time.time() + 1)
    assert (
        store.store_audit("dev-a", batch(ROWS[10:], (cp(new, ROWS[-1]),), new.public.raw.hex())).status
        == "ok"
    )
    assert store.verify_device("dev-a") == (20, [])


def test_a_key_pinned_by_an_older_hub_counts_as_registered(tmp_path: Path) -> None:
    HubStore(tmp_path / "hub.db").close()
    conn = sqlite3.connect(tmp_path / "hub.db")
    conn.execute("INSERT INTO devices (device, key) VALUES ('dev-a', ?)", (K,))
    conn.execute("DELETE FROM audit_keys")
    conn.execute("DROP TABLE schema_version")  # a file written before schema versions
    conn.commit()
    conn.close()
    store = HubStore(tmp_path / "hub.db")
    assert store.audit_keys("dev-a") == [K]
    assert store.store_audit("dev-a", batch(ROWS, (cp(KEY, ROWS[-1]),), K)).status == "ok"


def test_enroll_prints_the_key_and_register_takes_it(tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    env = {"EDGE_AGENT_STATE_DIR": str(tmp_path / "state"), "PATH": "/usr/bin:/bin"}
    root = repo.path / "metadata" / "root.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "enroll",
            "--root",
            str(root),
            "--device-id",
            "dev-a",
            "--group",
            "edge",
        ],
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("register it at the hub: "))
    argv = line.removeprefix("register it at the hub: edge-hub ").split()
    assert hub_main([*argv, "--db", str(tmp_path / "hub.db")]) == 0
    key_hex = argv[argv.index("--audit-key") + 1]
    assert HubStore(tmp_path / "hub.db").audit_keys("dev-a") == [key_hex]
    assert (
        hub_main(["device", "register", "dev-a", "--audit-key", "zz", "--db", str(tmp_path / "hub.db")]) == 2
    )
    assert (
        hub_main(["device", "register", "hub", "--audit-key", key_hex, "--db", str(tmp_path / "hub.db")]) == 2
    )
