"""Audit upload to the hub: idempotent storage by (device, seq), chain checks, outage recovery."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from agent.audit import AuditLog, Entry
from agent.sync.audit_upload import AuditUploader
from fleet.chain import GENESIS, make_checkpoint, seal_all
from fleet.device_key import DeviceKey
from fleet.messages import AuditBatch
from fleet.mqtt import MqttClient
from hub.sync.collect import Collector
from hub.sync.store import HubStore
from tests.sync.broker import Broker


def entries(n: int, start: int = 0) -> list[Entry]:
    return [
        Entry("request", f"model/{i}", "allow", "test", {"uid": 1000}, {"i": i})
        for i in range(start, start + n)
    ]


def signed_at(key: DeviceKey, row: object) -> tuple[int, str, str]:
    """The checkpoint the uploader signs at a batch's last record (the hub requires it)."""
    cp = make_checkpoint(row.seq, row.hash, key.key_id, time.time(), key.sign)  # type: ignore[attr-defined]
    return (cp.seq, cp.body, cp.signature)


def batch_of(
    key: DeviceKey,
    rows: list,
    device: str = "dev-a",
    cps: tuple = (),
    *,
    sign: bool = True,  # type: ignore[type-arg]
) -> AuditBatch:
    extra = (signed_at(key, rows[-1]),) if sign else ()
    return AuditBatch(
        device, tuple((r.seq, r.body, r.hash) for r in rows), (*cps, *extra), key.public.raw.hex()
    )


def new_store(path: str | Path, key: DeviceKey, device: str = "dev-a") -> HubStore:
    store = HubStore(path)
    store.register_key(device, key.public.raw.hex())
    return store


def test_store_is_idempotent_and_acks_contiguously(hub_db: str | Path) -> None:
    key = DeviceKey.generate()
    rows = seal_all(entries(30), 0, GENESIS, time.time())
    store = new_store(hub_db, key)
    assert store.store_audit("dev-a", batch_of(key, rows[:10])).up_to_seq == 10
    assert store.store_audit("dev-a", batch_of(key, rows[:10])).up_to_seq == 10  # replay
    assert store.store_audit("dev-a", batch_of(key, rows[5:20])).up_to_seq == 20  # overlap
    gap = store.store_audit("dev-a", batch_of(key, rows[25:]))
    assert gap.up_to_seq == 20 and gap.status == "ok"
    assert store.store_audit("dev-a", batch_of(key, rows[20:])).up_to_seq == 30
    assert store.audit_count("dev-a") == (30, 30)
    assert store.verify_device("dev-a") == (30, [])


def _tampered(rows: list, i: int, **change: object) -> list:  # type: ignore[type-arg]
    from fleet.chain import Sealed, canonical, record_hash

    body = json.loads(rows[i].body)
    body.update(change)
    text = canonical(body)
    out = list(rows)
    out[i] = Sealed(rows[i].seq, text, record_hash(text))
    return out


BAD_BATCHES = [
    pytest.param("altered-body-keeps-old-hash", id="altered"),
    pytest.param("rehashed-but-chain-broken", id="broken-link"),
    pytest.param("rewritten-held-record", id="rewritten"),
    pytest.param("forged-checkpoint", id="forged-checkpoint"),
    pytest.param("other-device-in-payload", id="device-mismatch"),
    pytest.param("device-key-changed", id="key-changed"),
]


@pytest.mark.parametrize("case", BAD_BATCHES)
def test_bad_batches_are_refused_and_nothing_is_stored(hub_db: str | Path, case: str) -> None:
    from fleet.chain import Sealed

    key = DeviceKey.generate()
    rows = seal_all(entries(20), 0, GENESIS, time.time())
    store = new_store(hub_db, key)
    assert store.store_audit("dev-a", batch_of(key, rows[:10])).up_to_seq == 10
    if case == "altered-body-keeps-old-hash":
        r = rows[12]
        bad = batch_of(
            key, [*rows[10:12], Sealed(r.seq, r.body.replace("allow", "deny"), r.hash), *rows[13:]]
        )
    elif case == "rehashed-but-chain-broken":
        bad = batch_of(key, _tampered(rows, 12, outcome="deny")[10:])
    elif case == "rewritten-held-record":
        bad = batch_of(key, _tampered(rows, 5, outcome="deny")[5:])
    elif case == "forged-checkpoint":
        other = DeviceKey.generate()
        cp = make_checkpoint(15, rows[14].hash, key.key_id, time.time(), other.sign)
        bad = batch_of(key, rows[10:], cps=((cp.seq, cp.body, cp.signature),))
    elif case == "other-device-in-payload":
        bad = batch_of(key, rows[10:], device="dev-b")
    else:
        bad = batch_of(DeviceKey.generate(), rows[10:])
    ack = store.store_audit("dev-a", bad)
    assert ack.status != "ok"
    assert ack.up_to_seq in (10, -1)
    assert store.audit_count("dev-a") == (10, 10)
    if case != "other-device-in-payload":
        assert store.devices()[0].problem
        assert any(e.kind == "audit" for _, e in store.events("dev-a"))


async def test_10000_records_written_while_broker_is_down_arrive_exactly_once(
    own_broker: Broker, tmp_path: Path, hub_db: str | Path
) -> None:
    key = DeviceKey.generate()
    log = AuditLog(tmp_path / "audit.db", key=key, max_bytes=1 << 30)
    log.start()
    store = new_store(hub_db, key)
    hub = MqttClient(own_broker.client_config("hub"))
    dev = MqttClient(own_broker.client_config("dev-a"))
    for c in (hub, dev):
        await c.start()
        await c.wait_connected(10)
    collector = Collector(hub, store)
    await collector.start()
    uploader = AuditUploader(dev, log, "dev-a", key.public.raw.hex(), batch_size=1000, ack_timeout_s=10)
    await uploader.start()
    try:
        own_broker.stop()
        await asyncio.wait_for(dev.wait_disconnected(), 10)
        futures = [log.submit(e) for e in entries(10_000)]
        await asyncio.to_thread(lambda: [f.result(60) for f in futures])
        head = log.stats().head_seq
        assert log.backlog() == head >= 10_000
        own_broker.start()
        deadline = time.monotonic() + 120
        while log.backlog() and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert log.backlog() == 0
    finally:
        await uploader.close()
        await dev.close()
        await hub.close()
        log.close()
    assert store.audit_count("dev-a") == (head, head)
    records, problems = store.verify_device("dev-a")
    assert (records, problems) == (head, [])
    stored = store.audit_records("dev-a")
    assert [r["seq"] for r in stored] == list(range(1, head + 1))


def test_first_contact_does_not_adopt_a_gap_as_anchor(hub_db: str | Path) -> None:
    """Batches 1..k lost in transit: a later batch must not become the device's chain start."""
    key = DeviceKey.generate()
    rows = seal_all(entries(30), 0, GENESIS, time.time())
    store = new_store(hub_db, key)
    ack = store.store_audit("dev-a", batch_of(key, rows[10:]))
    assert ack.up_to_seq == 0
    assert store.audit_count("dev-a") == (0, 0)
    assert store.store_audit("dev-a", batch_of(key, rows)).up_to_seq == 30


def test_a_pruned_device_is_anchored_where_it_says(hub_db: str | Path) -> None:
    key = DeviceKey.generate()
    rows = seal_all(entries(30), 0, GENESIS, time.time())
    store = new_store(hub_db, key)
    pruned = AuditBatch(
        "dev-a",
        tuple((r.seq, r.body, r.hash) for r in rows[10:]),
        (signed_at(key, rows[-1]),),
        key.public.raw.hex(),
        10,
    )
    assert store.store_audit("dev-a", pruned).up_to_seq == 30
    assert store.verify_device("dev-a") == (20, [])
