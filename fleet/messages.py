"""Our own message types for fleet sync, their topics and their bytes (see docs/protocol.md).

Pure: no I/O, no paho. :mod:`fleet.mqtt` speaks :class:`Outgoing`/:class:`Incoming`; the
domain messages below encode to and decode from payload bytes.

Invariants:
- ``decode(encode(m)) == m`` for every domain message; decoders refuse anything else with
  :class:`ProtocolError` (unknown fields, wrong types, oversize payloads) and never raise another type.
- JSON payloads are canonical (sorted keys, no spaces, UTF-8) so equal messages are equal bytes.
- Chunk replies are binary: the payload is the chunk itself; the status travels as an MQTT 5 user
  property, so a 4 MiB chunk is never copied through a JSON encoder.
- Device ids and group names match ``[a-z0-9][a-z0-9._-]{0,63}``: they are MQTT topic levels and
  certificate CNs, so they never contain ``/``, ``+``, ``#`` or ``$``.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.errors import ProtocolError

PREFIX = "edge/v1"
META_PREFIX = f"{PREFIX}/repo/meta/"
META_INDEX = "index.json"
BLOB_REQUESTS = f"{PREFIX}/repo/blobs/get"
HUB_SHARE_GROUP = "hub"
MAX_JSON_BYTES = 8 << 20
MAX_CHUNK_BYTES = 16 << 20

_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_META_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Status(enum.StrEnum):
    """Outcome codes carried by chunk replies, audit acks and events. Stable strings."""

    OK = "ok"
    NOT_FOUND = "not_found"
    BAD_REQUEST = "bad_request"
    BUSY = "busy"
    INSTALLED = "installed"
    ACTIVATED = "activated"
    DEFERRED = "deferred_maintenance_window"
    DOWNLOAD_WINDOW = "deferred_download_window"
    """A transfer stopped or did not start: the box's ``[hub] download_window`` is closed."""
    CHUNK_HASH_MISMATCH = "chunk_hash_mismatch"
    FILE_HASH_MISMATCH = "file_hash_mismatch"
    DISK_FULL = "disk_full"
    TIMEOUT = "timeout"
    METADATA_REFUSED = "metadata_refused"
    SMOKE_TEST_FAILED = "smoke_test_failed"
    LOAD_FAILED = "load_failed"
    MODEL_REFUSED = "model_refused"
    """Crash isolation refused the model: its trial crashed or hung, or the daemon died loading it."""
    CHAIN_BROKEN = "chain_broken"
    KEY_NOT_REGISTERED = "key_not_registered"
    """The hub has no audit key registered for the device (``edge-hub device register``)."""
    UNSIGNED = "unsigned"
    """An audit batch without a valid checkpoint at its last record, by the registered key."""
    RETRY = "retry"
    """The hub could not store an audit batch now (its database is unavailable): send again from
    the acknowledged mark after the ack's ``retry_after`` seconds. Acknowledges nothing."""
    POLICY_APPLIED = "policy_applied"
    POLICY_REFUSED = "policy_refused"
    UNLOADED = "unloaded"
    REMOVED = "removed"
    ERROR = "error"


RESERVED_DEVICE_IDS = frozenset({"hub", "operator", "ca", "broker"})
"""The names :data:`registry.device.RESERVED_DEVICE_IDS` refuses at enrollment (kept equal by a
test; the registry imports no package of ours and this module stays light)."""


def check_device_id(value: str) -> str:
    """:func:`check_id` for a device, also refusing the reserved names (``hub``, ``operator``,
    ``ca``, ``broker``: broker roles and certificate files)."""
    check_id(value)
    if value in RESERVED_DEVICE_IDS:
        raise ProtocolError(f"bad device id {value!r}: reserved for the broker's own identities")
    return value


def check_id(value: str, what: str = "device id") -> str:
    """Return ``value`` if it is a valid device id or group name, else raise :class:`ProtocolError`."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ProtocolError(f"bad {what} {value!r}: expected [a-z0-9][a-z0-9._-]{{0,63}}")
    return value


# --- topics ----------------------------------------------------------------------------------


def meta_topic(file_name: str) -> str:
    """Retained TUF metadata file (``root.json``, ``3.root.json``, ``timestamp.json`` ...)."""
    if not _META_FILE.fullmatch(file_name):
        raise ProtocolError(f"bad metadata file name {file_name!r}")
    return META_PREFIX + file_name


def device_topic(device_id: str, leaf: str) -> str:
    """``edge/v1/devices/<id>/<leaf>``; leaf is one of :data:`DEVICE_LEAVES`."""
    if leaf not in DEVICE_LEAVES:
        raise ProtocolError(f"unknown device topic {leaf!r}")
    return f"{PREFIX}/devices/{check_id(device_id)}/{leaf}"


DEVICE_LEAVES = ("state", "status", "blobs", "audit", "audit/ack", "events", "events/ack")


def shared(topic: str, group: str = HUB_SHARE_GROUP) -> str:
    """The shared-subscription filter by which hub workers split ``topic`` between them."""
    return f"$share/{group}/{topic}"


def device_of(topic: str) -> tuple[str, str]:
    """``edge/v1/devices/<id>/<leaf>`` -> ``(id, leaf)``; ProtocolError for other topics."""
    head = f"{PREFIX}/devices/"
    if not topic.startswith(head):
        raise ProtocolError(f"not a device topic: {topic!r}")
    device, _, leaf = topic[len(head) :].partition("/")
    check_device_id(device)
    if leaf not in DEVICE_LEAVES:
        raise ProtocolError(f"unknown device topic {topic!r}")
    return device, leaf


# --- transport-level types (spoken by fleet.mqtt) ----------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish. ``user`` holds MQTT 5 user properties."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    response_topic: str | None = None
    correlation: bytes | None = None
    user: tuple[tuple[str, str], ...] = ()
    expiry_s: int | None = None


@dataclass(frozen=True, slots=True)
class Incoming:
    """A received message, copied out of paho's object on the network thread."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation: bytes | None = None
    user: tuple[tuple[str, str], ...] = ()

    def prop(self, name: str) -> str | None:
        for key, value in self.user:
            if key == name:
                return value
        return None


# --- JSON helpers ----------------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _loads(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_JSON_BYTES:
        raise ProtocolError(f"{what}: payload larger than {MAX_JSON_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"{what}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{what}: expected a JSON object")
    return data


def _fields(
    data: Mapping[str, Any], what: str, required: set[str], optional: frozenset[str] | set[str] = frozenset()
) -> None:
    missing = required - set(data)
    unknown = set(data) - required - set(optional)
    if missing:
        raise ProtocolError(f"{what}: missing {', '.join(sorted(missing))}")
    if unknown:
        raise ProtocolError(f"{what}: unknown {', '.join(sorted(unknown))}")


def _int(data: Mapping[str, Any], key: str, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ProtocolError(f"{what}: {key} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _str(data: Mapping[str, Any], key: str, what: str, max_len: int = 256) -> str:
    value = data[key]
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"{what}: {key} must be a string of at most {max_len} chars")
    return value


# --- domain messages -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    """Ask for ``length`` bytes at ``offset`` of the blob whose sha256 is ``sha256``.

    Sent to :data:`BLOB_REQUESTS` (QoS 1) with response topic ``devices/<id>/blobs`` and correlation
    data ``<sha256>:<index>``; the device checks the answer against the signed chunk hash.
    """

    sha256: str
    index: int
    offset: int
    length: int

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not _HEX64.fullmatch(self.sha256):
            raise ProtocolError("chunk request: sha256 must be 64 lowercase hex")
        for name, hi in (("index", 1 << 31), ("offset", 1 << 50), ("length", MAX_CHUNK_BYTES)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= hi:
                raise ProtocolError(f"chunk request: {name} out of range: {value!r}")
        if self.length == 0:
            raise ProtocolError("chunk request: length must be positive")

    @property
    def correlation(self) -> bytes:
        return f"{self.sha256}:{self.index}".encode()

    def encode(self) -> bytes:
        return _dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> ChunkRequest:
        data = _loads(raw, "chunk request")
        _fields(data, "chunk request", {"sha256", "index", "offset", "length"})
        return cls(data["sha256"], data["index"], data["offset"], data["length"])


def parse_correlation(raw: bytes | None) -> tuple[str, int]:
    """``b"<sha256>:<index>"`` -> ``(sha256, index)``; ProtocolError otherwise."""
    if raw is None or len(raw) > 80:
        raise ProtocolError("missing or oversize correlation data")
    text = raw.decode("ascii", errors="replace")
    sha, _, index = text.partition(":")
    if not _HEX64.fullmatch(sha) or not index.isdigit() or len(index) > 10:
        raise ProtocolError(f"bad correlation data {text!r}")
    return sha, int(index)


Row = tuple[int, str, str]
"""A sealed audit record ``(seq, body, hash)`` or checkpoint ``(seq, body, signature)``."""


def _rows(value: object, what: str) -> tuple[Row, ...]:
    if not isinstance(value, list) or len(value) > 100_000:
        raise ProtocolError(f"audit batch: {what} must be a list of at most 100000")
    out: list[Row] = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 3
            or not isinstance(item[0], int)
            or isinstance(item[0], bool)
            or not isinstance(item[1], str)
            or not isinstance(item[2], str)
            or len(item[1]) > 1 << 20
            or len(item[2]) > 512
        ):
            raise ProtocolError(f"audit batch: each of {what} must be [seq, body, hash-or-signature]")
        out.append((item[0], item[1], item[2]))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class AuditBatch:
    """Consecutive sealed records of one device (``rows[i][0] == rows[0][0] + i``), the signed
    checkpoints that fall in their range, and the device's public key (hex) to check them.

    The hub takes the device id from the *topic* (the broker's ACL binds it to the certificate);
    ``device`` must agree with it.
    """

    device: str
    rows: tuple[Row, ...]
    checkpoints: tuple[Row, ...] = ()
    key: str = ""
    anchor: int = 0
    """The device log's anchor: records up to it were pruned (after an upload) and are not sent."""

    def __post_init__(self) -> None:
        check_id(self.device)
        if not self.rows:
            raise ProtocolError("audit batch: empty")
        first = self.rows[0][0]
        if first < 1:
            raise ProtocolError("audit batch: seq counts from 1")
        if not isinstance(self.anchor, int) or isinstance(self.anchor, bool) or not 0 <= self.anchor < first:
            raise ProtocolError("audit batch: anchor must be below the first seq")
        for i, row in enumerate(self.rows):
            if row[0] != first + i:
                raise ProtocolError(f"audit batch: row {i} has seq {row[0]}, expected {first + i}")
        if len(self.key) > 128:
            raise ProtocolError("audit batch: key too long")

    @property
    def first_seq(self) -> int:
        return self.rows[0][0]

    @property
    def last_seq(self) -> int:
        return self.rows[-1][0]

    def encode(self) -> bytes:
        return _dumps(
            {
                "anchor": self.anchor,
                "checkpoints": [list(c) for c in self.checkpoints],
                "device": self.device,
                "key": self.key,
                "rows": [list(r) for r in self.rows],
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> AuditBatch:
        data = _loads(raw, "audit batch")
        _fields(data, "audit batch", {"device", "rows"}, {"checkpoints", "key", "anchor"})
        key = data.get("key", "")
        if not isinstance(key, str):
            raise ProtocolError("audit batch: key must be a string")
        return cls(
            _str(data, "device", "audit batch"),
            _rows(data["rows"], "rows"),
            _rows(data.get("checkpoints", []), "checkpoints"),
            key,
            data.get("anchor", 0),
        )


@dataclass(frozen=True, slots=True)
class AuditAck:
    """The hub holds every record of the device up to ``up_to_seq`` (contiguously from the first).

    ``status`` is ``ok``, or ``chain_broken`` with ``detail`` when a stored record does not chain,
    or ``retry``: the hub could not store the batch now and asks for it again after
    ``retry_after`` seconds (present with ``retry`` only, ``0 < retry_after <= MAX_RETRY_AFTER_S``;
    ``up_to_seq`` is then -1 and means nothing). An agent older than ``retry`` refuses the unknown
    field as malformed and falls back to its ack timeout.
    """

    up_to_seq: int
    status: str = Status.OK.value
    detail: str = ""
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if (self.status == Status.RETRY.value) != (self.retry_after is not None):
            raise ProtocolError("audit ack: retry_after comes with status retry, and only with it")
        if self.retry_after is not None and not 0 < self.retry_after <= MAX_RETRY_AFTER_S:
            raise ProtocolError(f"audit ack: retry_after must be in (0, {MAX_RETRY_AFTER_S:g}] seconds")

    def encode(self) -> bytes:
        data: dict[str, Any] = {"detail": self.detail, "status": self.status, "up_to_seq": self.up_to_seq}
        if self.retry_after is not None:
            data["retry_after"] = self.retry_after
        return _dumps(data)

    @classmethod
    def decode(cls, raw: bytes) -> AuditAck:
        data = _loads(raw, "audit ack")
        _fields(data, "audit ack", {"up_to_seq"}, {"status", "detail", "retry_after"})
        retry_after = data.get("retry_after")
        if retry_after is not None and (
            not isinstance(retry_after, int | float) or isinstance(retry_after, bool)
        ):
            raise ProtocolError("audit ack: retry_after must be a number of seconds")
        return cls(
            _int(data, "up_to_seq", "audit ack", lo=-1),
            _str(data, "status", "audit ack") if "status" in data else Status.OK.value,
            _str(data, "detail", "audit ack", 2000) if "detail" in data else "",
            float(retry_after) if retry_after is not None else None,
        )


MAX_RETRY_AFTER_S = 300.0
"""The longest wait a ``retry`` audit ack may ask for."""


MAX_ACK_IDS = 500


@dataclass(frozen=True, slots=True)
class EventAck:
    """The hub stored the events ``ids`` of the device (``devices/<id>/events/ack``, QoS 1): only
    then do they leave the device's outbox (a PUBACK only says the broker has them)."""

    ids: tuple[str, ...]

    def encode(self) -> bytes:
        return _dumps({"ids": list(self.ids)})

    @classmethod
    def decode(cls, raw: bytes) -> EventAck:
        data = _loads(raw, "event ack")
        _fields(data, "event ack", {"ids"})
        ids = data["ids"]
        if (
            not isinstance(ids, list)
            or len(ids) > MAX_ACK_IDS
            or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in ids)
        ):
            raise ProtocolError(f"event ack: ids must be a list of at most {MAX_ACK_IDS} event ids")
        return cls(tuple(ids))


@dataclass(frozen=True, slots=True)
class Event:
    """An outcome the device reports on ``devices/<id>/events`` (QoS 1).

    ``id`` (when not empty) is unique per device: delivery is at least once (an event is re-sent
    when the broker's PUBACK was lost), and the hub stores an id once."""

    kind: str
    """``deployment``, ``policy``, ``transfer`` or ``security``."""
    status: str
    target: str = ""
    detail: str = ""
    at: float = 0.0
    id: str = ""

    def encode(self) -> bytes:
        data = asdict(self)
        if not self.id:
            del data["id"]
        return _dumps(data)

    @classmethod
    def decode(cls, raw: bytes) -> Event:
        data = _loads(raw, "event")
        _fields(data, "event", {"kind", "status"}, {"target", "detail", "at", "id"})
        at = data.get("at", 0.0)
        if not isinstance(at, int | float) or isinstance(at, bool):
            raise ProtocolError("event: at must be a number")
        return cls(
            _str(data, "kind", "event", 32),
            _str(data, "status", "event", 64),
            _str(data, "target", "event", 400) if "target" in data else "",
            _str(data, "detail", "event", 2000) if "detail" in data else "",
            float(at),
            _str(data, "id", "event", 64) if "id" in data else "",
        )


@dataclass(frozen=True, slots=True)
class StateReport:
    """Reported state on ``devices/<id>/state`` (not retained; sent after every connect and on
    change). ``online`` False is the Last Will."""

    device: str
    online: bool
    agent_version: str = ""
    groups: tuple[str, ...] = ()
    hardware: Mapping[str, Any] = field(default_factory=dict)
    selected_model: str | None = None
    loaded_models: tuple[str, ...] = ()
    installed: tuple[str, ...] = ()
    """target paths of the models present in the local store"""
    policy_version: str | None = None
    audit_backlog: int = 0
    last_sync: float | None = None
    at: float = 0.0
    failing: tuple[Mapping[str, Any], ...] = ()
    """deployments whose activation failed: ``model``, ``version``, ``attempts``, ``next_retry``
    (epoch seconds), ``error``"""
    events_pending: int = 0
    """events waiting in the outbox for the broker"""
    events_dropped: int = 0
    """events dropped because the outbox was full (oldest first), since the outbox was created"""
    health: tuple[Mapping[str, Any], ...] = ()
    """per (model, version) served: ``model``, ``version``, ``requests``, ``errors``, ``activation``,
    ``ttft_p95_s``, ``tokens_per_s``, ``samples`` (:mod:`agent.health`, at most 8 entries)"""
    serving: Mapping[str, str] = field(default_factory=dict)
    """model id -> version the pool serves from the registry store"""

    def encode(self) -> bytes:
        data = asdict(self)
        for key in ("groups", "loaded_models", "installed"):
            data[key] = list(data[key])
        data["hardware"] = dict(self.hardware)
        data["failing"] = [dict(f) for f in self.failing]
        data["health"] = [dict(h) for h in self.health]
        data["serving"] = dict(self.serving)
        return _dumps(data)

    @classmethod
    def decode(cls, raw: bytes) -> StateReport:
        data = _loads(raw, "state")
        known = set(cls.__dataclass_fields__)
        _fields(data, "state", {"device", "online"}, known - {"device", "online"})
        if not isinstance(data["online"], bool):
            raise ProtocolError("state: online must be true or false")
        for key in ("groups", "loaded_models", "installed"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ProtocolError(f"state: {key} must be a list of strings")
            data[key] = tuple(value)
        if not isinstance(data.get("hardware", {}), dict):
            raise ProtocolError("state: hardware must be an object")
        failing = data.get("failing", [])
        if not isinstance(failing, list) or not all(isinstance(f, dict) for f in failing):
            raise ProtocolError("state: failing must be a list of objects")
        data["failing"] = tuple(failing)
        health = data.get("health", [])
        if not isinstance(health, list) or len(health) > 64 or not all(isinstance(h, dict) for h in health):
            raise ProtocolError("state: health must be a list of at most 64 objects")
        data["health"] = tuple(health)
        serving = data.get("serving", {})
        if not isinstance(serving, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in serving.items()
        ):
            raise ProtocolError("state: serving must map model ids to versions")
        data["serving"] = serving
        for key in ("events_pending", "events_dropped"):
            if key in data:
                _int(data, key, "state")
        try:
            report = cls(**data)
        except TypeError as exc:
            raise ProtocolError(f"state: {exc}") from None
        check_id(report.device)
        return report


def offline_will(device_id: str) -> Outgoing:
    """The Last Will: ``{"device": id, "online": false}`` on the device's status topic.

    Not retained: devices never publish retained messages (the broker refuses them,
    mosquitto/edge_acl.c, and would silently drop a retained Will); the hub keeps the inventory in
    its own store."""
    return Outgoing(
        device_topic(device_id, "status"),
        _dumps({"device": check_id(device_id), "online": False}),
        qos=1,
    )


def online_status(device_id: str, at: float) -> Outgoing:
    """``{"at": ..., "device": id, "online": true}``, sent after every connect (not retained)."""
    return Outgoing(
        device_topic(device_id, "status"),
        _dumps({"at": at, "device": check_id(device_id), "online": True}),
        qos=1,
    )


def parse_status(raw: bytes) -> tuple[str, bool]:
    data = _loads(raw, "status")
    _fields(data, "status", {"device", "online"}, {"at"})
    if not isinstance(data["online"], bool):
        raise ProtocolError("status: online must be true or false")
    return check_id(data["device"]), data["online"]


@dataclass(frozen=True, slots=True)
class MetaIndex:
    """Retained ``repo/meta/index.json``: which metadata files the hub publishes.

    Not trusted for content (every file is verified by TUF); it only lets the fetcher answer
    "not published" at once instead of waiting for a retained message that will never come.
    """

    files: tuple[str, ...]

    def encode(self) -> bytes:
        return _dumps({"files": sorted(self.files)})

    @classmethod
    def decode(cls, raw: bytes) -> MetaIndex:
        data = _loads(raw, "meta index")
        _fields(data, "meta index", {"files"})
        files = data["files"]
        if not isinstance(files, list) or not all(
            isinstance(f, str) and _META_FILE.fullmatch(f) for f in files
        ):
            raise ProtocolError("meta index: files must be a list of metadata file names")
        return cls(tuple(files))


HUB_PRESENCE = "hub.presence"
"""Name, under ``repo/meta/``, of the hub's retained presence. Not a TUF file: never listed in
``index.json``, never fetched by python-tuf, so nothing trusts it; it only tells devices when to
ask again (docs/protocol.md, "Hub presence")."""


@dataclass(frozen=True, slots=True)
class HubPresence:
    """Retained ``repo/meta/hub.presence``: ``online`` with a fresh random ``session`` each time
    the hub (re)connects and has its subscriptions in place; ``online: false`` (its Last Will, or
    its goodbye) when it goes."""

    online: bool
    session: str
    at: float

    def encode(self) -> bytes:
        return _dumps({"at": self.at, "online": self.online, "session": self.session})

    @classmethod
    def decode(cls, raw: bytes) -> HubPresence:
        data = _loads(raw, "hub presence")
        _fields(data, "hub presence", {"at", "online", "session"})
        online, at = data["online"], data["at"]
        if not isinstance(online, bool):
            raise ProtocolError("hub presence: online must be true or false")
        if not isinstance(at, int | float) or isinstance(at, bool):
            raise ProtocolError("hub presence: at must be a number")
        return cls(online, _str(data, "session", "hub presence", 64), float(at))


__all__ = [
    "BLOB_REQUESTS",
    "HUB_PRESENCE",
    "HubPresence",
    "DEVICE_LEAVES",
    "HUB_SHARE_GROUP",
    "MAX_CHUNK_BYTES",
    "META_INDEX",
    "META_PREFIX",
    "PREFIX",
    "Row",
    "AuditAck",
    "AuditBatch",
    "ChunkRequest",
    "Event",
    "EventAck",
    "MAX_ACK_IDS",
    "MAX_RETRY_AFTER_S",
    "Incoming",
    "MetaIndex",
    "Outgoing",
    "StateReport",
    "Status",
    "RESERVED_DEVICE_IDS",
    "check_device_id",
    "check_id",
    "device_of",
    "device_topic",
    "meta_topic",
    "offline_will",
    "online_status",
    "parse_correlation",
    "parse_status",
    "shared",
]
