"""Message encodings: round trips, and every malformed payload refused with ProtocolError."""

from __future__ import annotations

import json

import pytest

from fleet.errors import ProtocolError
from fleet.messages import (
    AuditAck,
    AuditBatch,
    ChunkRequest,
    Event,
    MetaIndex,
    StateReport,
    device_of,
    device_topic,
    meta_topic,
    parse_correlation,
    parse_status,
)

SHA = "a" * 64


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(ChunkRequest(SHA, 2, 8192, 4096), id="chunk-request"),
        pytest.param(
            AuditBatch("dev-a", ((3, "{}", "h"), (4, "{}", "i")), ((4, "{}", "sig"),), "ab", 2), id="audit"
        ),
        pytest.param(AuditAck(10, "chain_broken", "record 11 altered"), id="audit-ack"),
        pytest.param(Event("deployment", "activated", "models/m/1", "serving", 12.5), id="event"),
        pytest.param(
            StateReport(
                "dev-a",
                True,
                "0.1",
                ("edge",),
                {"cpu": {"cores": 2}},
                "m",
                ("m",),
                ("models/m/1/f",),
                "3",
                5,
                1.0,
                2.0,
            ),
            id="state",
        ),
        pytest.param(MetaIndex(("1.root.json", "timestamp.json")), id="meta-index"),
    ],
)
def test_round_trip(message: object) -> None:
    assert type(message).decode(message.encode()) == message  # type: ignore[attr-defined]


BAD = [
    pytest.param(ChunkRequest, b"not json", id="chunk-not-json"),
    pytest.param(ChunkRequest, b"[]", id="chunk-not-object"),
    pytest.param(
        ChunkRequest,
        json.dumps({"sha256": "x", "index": 0, "offset": 0, "length": 1}).encode(),
        id="chunk-bad-sha",
    ),
    pytest.param(
        ChunkRequest,
        json.dumps({"sha256": SHA, "index": -1, "offset": 0, "length": 1}).encode(),
        id="chunk-negative-index",
    ),
    pytest.param(
        ChunkRequest,
        json.dumps({"sha256": SHA, "index": 0, "offset": 0, "length": 0}).encode(),
        id="chunk-empty",
    ),
    pytest.param(
        ChunkRequest,
        json.dumps({"sha256": SHA, "index": 0, "offset": 0, "length": 1 << 30}).encode(),
        id="chunk-too-long",
    ),
    pytest.param(
        ChunkRequest,
        json.dumps({"sha256": SHA, "index": True, "offset": 0, "length": 1}).encode(),
        id="chunk-bool-index",
    ),
    pytest.param(
        ChunkRequest,
        json.dumps({"sha256": SHA, "index": 0, "offset": 0, "length": 1, "x": 1}).encode(),
        id="chunk-unknown-field",
    ),
    pytest.param(AuditBatch, json.dumps({"device": "dev-a", "rows": []}).encode(), id="audit-empty"),
    pytest.param(
        AuditBatch,
        json.dumps({"device": "dev-a", "rows": [[1, "{}", "h"], [3, "{}", "h"]]}).encode(),
        id="audit-gap",
    ),
    pytest.param(
        AuditBatch, json.dumps({"device": "dev-a", "rows": [[0, "{}", "h"]]}).encode(), id="audit-seq-zero"
    ),
    pytest.param(
        AuditBatch, json.dumps({"device": "DEV/A", "rows": [[1, "{}", "h"]]}).encode(), id="audit-bad-device"
    ),
    pytest.param(
        AuditBatch, json.dumps({"device": "dev-a", "rows": [[1, "{}"]]}).encode(), id="audit-short-row"
    ),
    pytest.param(
        AuditBatch,
        json.dumps({"device": "dev-a", "rows": [[1, "{}", "h"]], "anchor": 1}).encode(),
        id="audit-anchor-not-below",
    ),
    pytest.param(AuditAck, json.dumps({"up_to_seq": "5"}).encode(), id="ack-string-seq"),
    pytest.param(Event, json.dumps({"kind": "deployment"}).encode(), id="event-missing-status"),
    pytest.param(Event, json.dumps({"kind": "d", "status": "s", "at": "now"}).encode(), id="event-bad-time"),
    pytest.param(
        StateReport, json.dumps({"device": "dev-a", "online": "yes"}).encode(), id="state-online-not-bool"
    ),
    pytest.param(
        StateReport,
        json.dumps({"device": "dev-a", "online": True, "groups": [1]}).encode(),
        id="state-bad-groups",
    ),
    pytest.param(
        StateReport,
        json.dumps({"device": "dev-a", "online": True, "shell": "rm"}).encode(),
        id="state-unknown-field",
    ),
    pytest.param(MetaIndex, json.dumps({"files": ["../root.json"]}).encode(), id="index-path-escape"),
    pytest.param(ChunkRequest, b" " * (9 << 20), id="oversize-payload"),
]


@pytest.mark.parametrize(("cls", "raw"), BAD)
def test_malformed_payloads_are_refused(cls: type, raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        cls.decode(raw)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(None, id="missing"),
        pytest.param(b"abc:1", id="short-sha"),
        pytest.param(SHA.encode() + b":x", id="non-numeric-index"),
        pytest.param(SHA.encode() + b":-1", id="negative-index"),
        pytest.param(SHA.encode() + b":" + b"9" * 40, id="oversize"),
    ],
)
def test_bad_correlation_data(raw: bytes | None) -> None:
    with pytest.raises(ProtocolError):
        parse_correlation(raw)


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("edge/v1/devices/dev-a", id="no-leaf"),
        pytest.param("edge/v1/devices/dev-a/secrets", id="unknown-leaf"),
        pytest.param("edge/v1/devices/+/state", id="wildcard-id"),
        pytest.param("edge/v2/devices/dev-a/state", id="other-prefix"),
    ],
)
def test_bad_device_topics(topic: str) -> None:
    with pytest.raises(ProtocolError):
        device_of(topic)


def test_topics() -> None:
    assert device_of(device_topic("dev-a", "audit/ack")) == ("dev-a", "audit/ack")
    assert meta_topic("3.root.json") == "edge/v1/repo/meta/3.root.json"
    with pytest.raises(ProtocolError):
        meta_topic("../x")
    with pytest.raises(ProtocolError):
        parse_status(b'{"device":"dev-a"}')
