"""Audit acknowledgements a device must not act on (issue 15, high #2).

A forged or replayed ack used to move the device's upload mark anywhere (``max(acked, up_to_seq)``
whatever its status), after which the records were pruned as uploaded and never reached the hub.
Now the uploader acts on an ack only when its status is ok, it is not retained, records are in
flight and it names one of them; any other status marks nothing, keeps the records and is reported.
Each case runs the real uploader and audit log against a real Mosquitto; the "hub" answering is an
identity allowed to write acks (operator), so the forgery reaches the device as a compromised hub
worker's would (a device identity cannot write an ack topic at all: tests/security/test_broker_acl.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.audit import AuditLog, Entry
from agent.sync.audit_upload import AuditUploader
from fleet.device_key import DeviceKey
from fleet.messages import AuditAck, AuditBatch, Incoming, Outgoing, device_topic
from fleet.mqtt import MqttClient
from hub.sync.collect import Collector
from hub.sync.store import HubStore
from tests.sync.broker import Broker
from tests.sync.helpers import wait_for

ACK = device_topic("dev-a", "audit/ack")
AUDIT = device_topic("dev-a", "audit")


def entries(n: int, start: int = 0) -> list[Entry]:
    return [
        Entry("request", f"model/{i}", "allow", "test", {"uid": 1000}, {"i": i})
        for i in range(start, start + n)
    ]


async def fill(log: AuditLog, n: int, start: int = 0) -> None:
    futures = [log.submit(e) for e in entries(n, start)]
    await asyncio.to_thread(lambda: [f.result(30) for f in futures])


async def connected(broker: Broker, cn: str, client_id: str | None = None) -> MqttClient:
    client = MqttClient(broker.client_config(cn, client_id=client_id))
    await client.start()
    await client.wait_connected(10)
    return client


def ack(up_to: int, status: str = "ok", detail: str = "") -> bytes:
    return AuditAck(up_to, status, detail).encode()


Answer = Callable[[AuditBatch], Awaitable[list[Outgoing]]]


async def forged_beyond(batch: AuditBatch) -> list[Outgoing]:
    return [Outgoing(ACK, ack(999_999_999), qos=1)]


async def chain_broken_far_ahead(batch: AuditBatch) -> list[Outgoing]:
    # what the hub answers a device whose audit database was recreated: its own last seq
    return [Outgoing(ACK, ack(5000, "chain_broken", "record 1 differs from the one held (rewritten)"), qos=1)]


async def bad_request(batch: AuditBatch) -> list[Outgoing]:
    return [Outgoing(ACK, ack(-1, "bad_request", "batch names device 'dev-b'"), qos=1)]


async def below_in_flight(batch: AuditBatch) -> list[Outgoing]:
    return [Outgoing(ACK, ack(0), qos=1)]  # "ok" but naming nothing sent: no progress


async def malformed(batch: AuditBatch) -> list[Outgoing]:
    return [Outgoing(ACK, b'{"up_to_seq": "all", "status": "ok"}', qos=1)]


# how the rogue answers each batch, and what the device does with it (a status: reported refusal)
ROGUE_ANSWERS = [
    pytest.param(forged_beyond, "ignored", id="forged-ok-beyond-anything-sent"),
    pytest.param(below_in_flight, "no_progress", id="ok-naming-only-what-was-marked-before"),
    pytest.param(malformed, "ignored", id="malformed-ack"),
    pytest.param(chain_broken_far_ahead, "chain_broken", id="chain-broken-with-hub-seq-ahead"),
    pytest.param(bad_request, "bad_request", id="bad-request"),
]


@pytest.mark.parametrize(("answer", "outcome"), ROGUE_ANSWERS)
async def test_an_ack_that_names_nothing_sent_or_refuses_marks_nothing(
    broker: Broker, tmp_path: Path, answer: Answer, outcome: str
) -> None:
    key = DeviceKey.generate()
    log = AuditLog(tmp_path / "audit.db", key=key)
    log.start()
    rogue = await connected(broker, "operator", client_id=f"rogue-{time.monotonic_ns()}")
    dev = await connected(broker, "dev-a")
    problems: list[tuple[str, str, int, int]] = []

    async def on_problem(status: str, detail: str, lo: int, hi: int) -> None:
        problems.append((status, detail, lo, hi))

    async def on_batch(msg: Incoming) -> None:
        for out in await answer(AuditBatch.decode(msg.payload)):
            await rogue.publish(out)

    await rogue.subscribe(AUDIT, on_batch, qos=1)
    uploader = AuditUploader(
        dev, log, "dev-a", key.public.raw.hex(), ack_timeout_s=1.0, problem_retry_s=0.5, on_problem=on_problem
    )
    try:
        await fill(log, 20)
        before = log.backlog()
        await uploader.start()
        if outcome == "ignored":
            await wait_for(lambda: uploader.acks_ignored >= 2, 20, "the forged acks to be seen")
        elif outcome == "no_progress":
            await asyncio.sleep(2.5)  # acted on, moves nothing: re-sent after each ack timeout
        else:
            await wait_for(lambda: problems, 20, "the refusal to be reported")
            await asyncio.sleep(1.5)  # a retry or two later: reported once, still nothing marked
            assert len(problems) == 1
            status, _detail, lo, hi = problems[0]
            assert (status, lo, hi) == (outcome, 1, before)
        assert log.backlog() == before == log.stats().head_seq
        assert uploader.uploaded_records == 0
        assert log.prune_uploaded() == 0  # nothing may be pruned as uploaded
    finally:
        await uploader.close()
        await dev.close()
        await rogue.close(end_session=True)
        log.close()


async def test_a_retained_ack_replayed_at_subscribe_is_ignored(own_broker: Broker, tmp_path: Path) -> None:
    """The attack of the issue: one retained ``{"up_to_seq": 999999999, "status": "ok"}`` on the
    ack topic (a device could retain it there before the ACL split; any hub identity still can)."""
    key = DeviceKey.generate()
    log = AuditLog(tmp_path / "audit.db", key=key)
    log.start()
    operator = await connected(own_broker, "operator")
    await operator.publish(Outgoing(ACK, ack(999_999_999), qos=1, retain=True))
    dev = await connected(own_broker, "dev-a")
    uploader = AuditUploader(dev, log, "dev-a", key.public.raw.hex(), ack_timeout_s=1.0)
    try:
        await fill(log, 10)
        await uploader.start()
        await wait_for(lambda: uploader.acks_ignored >= 1, 10, "the retained ack")
        await asyncio.sleep(1.5)
        assert log.backlog() == 10
    finally:
        await uploader.close()
        await dev.close()
        await operator.publish(Outgoing(ACK, b"", qos=1, retain=True))
        await operator.close()
        log.close()


async def test_a_recreated_audit_database_keeps_its_records_and_raises_an_event(
    own_broker: Broker, tmp_path: Path
) -> None:
    """Without any attacker: the device's audit database is recreated; the real hub answers the new
    records ``chain_broken`` with its own (higher) last seq. Nothing is marked, nothing is pruned,
    and the refusal is reported once."""
    store = HubStore(tmp_path / "hub.db")
    hub = await connected(own_broker, "hub", client_id="hub-collect")
    collector = Collector(hub, store)
    await collector.start()
    key = DeviceKey.generate()
    store.register_key("dev-a", key.public.raw.hex())
    first = AuditLog(tmp_path / "first.db", key=key)
    first.start()
    dev = await connected(own_broker, "dev-a")
    up = AuditUploader(dev, first, "dev-a", key.public.raw.hex(), ack_timeout_s=5.0)
    await up.start()
    await fill(first, 30)
    await wait_for(lambda: first.backlog() == 0, 30, "the first log uploaded")
    await up.close()
    first.close()
    assert store.audit_count("dev-a") == (30, 30)

    again = AuditLog(tmp_path / "again.db", key=key)  # recreated: seq 1.. again, other records
    again.start()
    problems: list[tuple[str, str, int, int]] = []

    async def on_problem(status: str, detail: str, lo: int, hi: int) -> None:
        problems.append((status, detail, lo, hi))

    up2 = AuditUploader(
        dev,
        again,
        "dev-a",
        key.public.raw.hex(),
        ack_timeout_s=5.0,
        problem_retry_s=0.5,
        on_problem=on_problem,
    )
    try:
        await fill(again, 5, start=1000)
        await up2.start()
        await wait_for(lambda: problems, 30, "the chain_broken event")
        await asyncio.sleep(1.5)
        assert [p[0] for p in problems] == ["chain_broken"]
        assert "rewritten" in problems[0][1]
        assert again.backlog() == 5
        assert again.prune_uploaded() == 0
        assert store.audit_count("dev-a") == (30, 30)
    finally:
        await up2.close()
        again.close()
        await dev.close()
        await hub.close(end_session=True)


async def test_a_replayed_batch_is_acknowledged_with_what_it_carried(tmp_path: Path) -> None:
    """The hub caps a replay's ack at the batch's last seq, so a device re-sending old records after
    lost acks is answered within what it sent (and so acts on the answer)."""
    import time as _time

    from fleet.chain import GENESIS, seal_all

    key = DeviceKey.generate()
    rows = seal_all(entries(30), 0, GENESIS, _time.time())
    store = HubStore(tmp_path / "hub.db")

    store.register_key("dev-a", key.public.raw.hex())

    def batch(part: list) -> AuditBatch:  # type: ignore[type-arg]
        from fleet.chain import make_checkpoint

        cp = make_checkpoint(part[-1].seq, part[-1].hash, key.key_id, _time.time(), key.sign)
        return AuditBatch(
            "dev-a",
            tuple((r.seq, r.body, r.hash) for r in part),
            ((cp.seq, cp.body, cp.signature),),
            key.public.raw.hex(),
        )

    assert store.store_audit("dev-a", batch(rows)).up_to_seq == 30
    assert store.store_audit("dev-a", batch(rows[:10])).up_to_seq == 10
    assert json.loads(store.store_audit("dev-a", batch(rows[5:20])).encode())["up_to_seq"] == 20
