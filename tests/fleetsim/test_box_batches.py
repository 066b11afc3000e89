"""SimBox's audit batches (what bench/hub_drain_bench.py queues at the broker): from the uploaded
mark to the head, cut at multiples of 1,000 as the device's uploader cuts them, each carrying the
checkpoint that signs its last record, chained without gap or overlap. Pure logic, no broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.messages import AuditBatch, device_topic
from fleet.mqtt import MqttConfig
from tests.fleetsim.box import SimBox


def box(records: int) -> SimBox:
    config = MqttConfig("127.0.0.1", 1, "sim-00000", Path("ca"), Path("crt"), Path("key"))
    b = SimBox("sim-00000", config, None)  # type: ignore[arg-type]  # no metadata needed here
    b.add_audit(records)
    return b


@pytest.mark.parametrize(
    ("records", "uploaded", "ranges"),
    [
        pytest.param(200, 0, [(1, 200)], id="one-short-batch"),
        pytest.param(1000, 0, [(1, 1000)], id="exactly-one-batch"),
        pytest.param(1500, 0, [(1, 1000), (1001, 1500)], id="two-batches"),
        pytest.param(2500, 1000, [(1001, 2000), (2001, 2500)], id="from-an-acknowledged-mark"),
        pytest.param(1500, 700, [(701, 1000), (1001, 1500)], id="mark-inside-a-batch"),
        pytest.param(1500, 1500, [], id="nothing-left"),
    ],
)
def test_audit_batches(records: int, uploaded: int, ranges: list[tuple[int, int]]) -> None:
    b = box(records)
    b.uploaded = uploaded
    out = b.audit_batches()
    assert all(m.topic == device_topic(b.id, "audit") and m.qos == 1 for m in out)
    batches = [AuditBatch.decode(m.payload) for m in out]
    assert [(x.first_seq, x.last_seq) for x in batches] == ranges
    for x in batches:
        assert x.last_seq in {c[0] for c in x.checkpoints}, "the batch's last record is signed"
        assert [r[0] for r in x.rows] == list(range(x.first_seq, x.last_seq + 1))
