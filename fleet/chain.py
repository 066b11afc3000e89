"""The audit hash chain and signed checkpoints: canonical bytes, sealing, verification. Pure.

A record is a JSON object with exactly the keys ``seq, time, actor, action, resource, outcome,
reason, details, prev``. Its *body* is the canonical JSON of that object (sorted keys, no spaces,
UTF-8) and its *hash* is ``sha256(RECORD_DOMAIN + body)`` in hex. ``prev`` is the hash of the
record before it (:data:`GENESIS` for the first), ``seq`` counts from 1 without gaps.

Invariants checked by :func:`verify` (the first violation is named, in log order):

- every stored hash is the hash of its body (else the record was *altered*);
- the record stored at position ``n`` has ``seq == n`` (else it was *reordered*, when the
  missing record turns up within :data:`REORDER_WINDOW` positions, or records were *removed*);
- positions follow each other without gaps (else records were *removed*);
- each record's ``prev`` is the hash of the record before it (else the chain is *broken*);
- every checkpoint is signed by the device key over ``CHECKPOINT_DOMAIN + body`` (else it is
  *forged*), and names the hash the log holds at its ``seq`` (else the log was *rewritten*);
- no checkpoint names a sequence number beyond the last record (else the tail was *truncated*).

Records pruned after upload are summarised by an *anchor* ``(seq, hash)``: the chain resumes
from it. Nothing here does I/O: the store hands rows in and gets a :class:`Report` out.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fleet.device_key import DevicePublicKey

RECORD_DOMAIN = b"edge-agent audit record v1\n"
CHECKPOINT_DOMAIN = b"edge-agent audit checkpoint v1\n"
GENESIS = "0" * 64
REORDER_WINDOW = 1024
RECORD_KEYS = frozenset(
    {"seq", "time", "actor", "action", "resource", "outcome", "reason", "details", "prev"}
)
MAX_PROBLEMS = 20


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(obj: Any) -> str:
    """Canonical JSON text: sorted keys, compact separators, non-ASCII kept as is."""
    return _ENCODER.encode(obj)


def record_hash(body: str) -> str:
    return hashlib.sha256(RECORD_DOMAIN + body.encode("utf-8")).hexdigest()


def iso_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class Entry:
    """What a caller wants recorded; sealing adds seq, time and prev."""

    action: str
    resource: str | None
    outcome: str
    reason: str
    actor: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Sealed:
    """A record as stored: its position, canonical body and hash."""

    seq: int
    body: str
    hash: str

    def record(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


def jsonable(value: Any) -> Any:
    """``value`` with what JSON cannot carry exactly (NaN, infinities, other types) as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, str | int | float):
        return value
    return str(value)


def seal(entry: Entry, seq: int, prev: str, ts: float | str) -> Sealed:
    """The record that follows ``prev`` at position ``seq`` (``ts``: epoch seconds or ISO time)."""
    record = {
        "seq": seq,
        "time": ts if isinstance(ts, str) else iso_time(ts),
        "actor": entry.actor,
        "action": entry.action,
        "resource": entry.resource,
        "outcome": entry.outcome,
        "reason": entry.reason,
        "details": entry.details,
        "prev": prev,
    }
    try:
        body = canonical(record)
    except (TypeError, ValueError):  # rare: NaN, infinities or objects in the details
        record.update(
            actor=jsonable(entry.actor),
            details=jsonable(entry.details),
            **{
                k: None if record[k] is None else str(record[k])
                for k in ("action", "resource", "outcome", "reason")
            },
        )
        body = canonical(record)
    return Sealed(seq, body, record_hash(body))


def seal_all(entries: Iterable[Entry], head_seq: int, head_hash: str, ts: float) -> list[Sealed]:
    out: list[Sealed] = []
    seq, prev = head_seq, head_hash
    when = iso_time(ts)  # one commit, one time
    for entry in entries:
        seq += 1
        sealed = seal(entry, seq, prev, when)
        out.append(sealed)
        prev = sealed.hash
    return out


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement: "record ``seq`` of this device's log has hash ``hash``"."""

    seq: int
    body: str
    signature: str

    def fields(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.body)
        return value


def make_checkpoint(seq: int, hash_: str, key_id: str, ts: float, sign: Any) -> Checkpoint:
    """``sign`` is the device key's ``sign(bytes) -> bytes``."""
    body = canonical({"seq": seq, "hash": hash_, "key_id": key_id, "time": iso_time(ts)})
    signature = sign(CHECKPOINT_DOMAIN + body.encode("utf-8"))
    return Checkpoint(seq, body, bytes(signature).hex())


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    """altered | reordered | removed | broken_link | malformed | forged_checkpoint |
    rewritten | truncated | unverifiable_checkpoint"""
    seq: int
    message: str


@dataclass(frozen=True, slots=True)
class Report:
    records: int
    checkpoints: int
    first_seq: int
    last_seq: int
    last_hash: str
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return self.problems[0] if self.problems else None


def _check_checkpoint(cp: Checkpoint, keys: Sequence[DevicePublicKey]) -> Problem | None:
    try:
        fields = cp.fields()
        key_id = fields["key_id"]
        ok_shape = fields["seq"] == cp.seq and isinstance(fields["hash"], str)
        signature = bytes.fromhex(cp.signature)
    except (ValueError, KeyError, TypeError):
        return Problem("forged_checkpoint", cp.seq, f"checkpoint at record {cp.seq} is malformed (forged)")
    if not ok_shape:
        return Problem(
            "forged_checkpoint", cp.seq, f"checkpoint at record {cp.seq} names another seq (forged)"
        )
    if not keys:
        return Problem(
            "unverifiable_checkpoint",
            cp.seq,
            f"checkpoint at record {cp.seq}: no device public key to check it",
        )
    matching = [k for k in keys if k.key_id == key_id]
    if not matching:
        return Problem(
            "forged_checkpoint",
            cp.seq,
            f"checkpoint at record {cp.seq} is signed by unknown key {key_id} (forged)",
        )
    data = CHECKPOINT_DOMAIN + cp.body.encode("utf-8")
    if not any(k.verify(signature, data) for k in matching):
        return Problem(
            "forged_checkpoint", cp.seq, f"checkpoint at record {cp.seq} has an invalid signature (forged)"
        )
    return None


def verify(
    rows: Iterable[Sealed],
    checkpoints: Iterable[Checkpoint],
    keys: Sequence[DevicePublicKey],
    anchor: tuple[int, str] = (0, GENESIS),
) -> Report:
    """Check the chain of ``rows`` (in stored order) from ``anchor`` and the ``checkpoints``."""
    problems: list[Problem] = []

    def add(p: Problem) -> None:
        if len(problems) < MAX_PROBLEMS:
            problems.append(p)

    cps = sorted(checkpoints, key=lambda c: c.seq)
    cp_hash: dict[int, str] = {}
    for cp in cps:
        bad = _check_checkpoint(cp, keys)
        if bad is not None:
            add(bad)
        else:
            cp_hash[cp.seq] = cp.fields()["hash"]
    anchor_seq, anchor_hash = anchor
    if anchor_seq in cp_hash and cp_hash[anchor_seq] != anchor_hash:
        add(
            Problem(
                "rewritten",
                anchor_seq,
                f"the pruned-log anchor at record {anchor_seq} disagrees with its checkpoint",
            )
        )

    expected, prev = anchor_seq + 1, anchor_hash
    count = 0
    first_seq = last_seq = anchor_seq
    window: deque[Sealed] = deque()
    source: Iterator[Sealed] = iter(rows)

    def ahead_contains(seq: int) -> bool:
        while len(window) < REORDER_WINDOW:
            nxt = next(source, None)
            if nxt is None:
                break
            window.append(nxt)
        return any(_body_seq(r) == seq for r in window)

    def pull() -> Sealed | None:
        if window:
            return window.popleft()
        return next(source, None)

    while (row := pull()) is not None:
        count += 1
        if count == 1:
            first_seq = row.seq
        last_seq = row.seq
        record = _parse(row)  # once per row: the checks below all read this
        body_seq = _seq_of(record)
        if record is None or body_seq is None:
            add(Problem("malformed", row.seq, f"record {row.seq} is not a well-formed record (altered)"))
        elif record_hash(row.body) != row.hash:
            add(Problem("altered", row.seq, f"record {row.seq} does not match its hash (altered)"))
        elif body_seq != row.seq:
            if body_seq != expected and ahead_contains(expected):
                add(Problem("reordered", row.seq, f"position {row.seq} holds record {body_seq} (reordered)"))
            elif body_seq > expected:
                add(
                    Problem(
                        "removed",
                        expected,
                        _missing(expected, body_seq - 1) + " (removed; later ones renumbered)",
                    )
                )
            else:
                add(Problem("reordered", row.seq, f"position {row.seq} holds record {body_seq} (reordered)"))
        elif row.seq > expected:
            add(Problem("removed", expected, _missing(expected, row.seq - 1) + " (removed)"))
        elif row.seq < expected:
            add(
                Problem(
                    "reordered",
                    row.seq,
                    f"record {row.seq} appears again after record {expected - 1} (reordered)",
                )
            )
        elif record["prev"] != prev:
            add(
                Problem(
                    "broken_link",
                    row.seq,
                    f"broken link between record {row.seq - 1} and record {row.seq}: "
                    f"its prev hash is not the hash of record {row.seq - 1}",
                )
            )
        want = cp_hash.get(row.seq)
        if want is not None and want != row.hash:
            add(
                Problem(
                    "rewritten", row.seq, f"record {row.seq} differs from its signed checkpoint (rewritten)"
                )
            )
        prev = row.hash
        if row.seq >= expected:
            expected = row.seq + 1
    beyond = [s for s in cp_hash if s > last_seq]
    if beyond:
        top = max(beyond)
        add(
            Problem(
                "truncated",
                last_seq + 1,
                _missing(last_seq + 1, top) + f" (truncated: a signed checkpoint covers record {top})",
            )
        )
    return Report(count, len(cps), first_seq, last_seq, prev, tuple(problems))


def _missing(first: int, last: int) -> str:
    return f"record {first} is missing" if first == last else f"records {first}..{last} are missing"


def _parse(row: Sealed) -> dict[str, Any] | None:
    """The record's fields, or None when the body is not a well-formed record."""
    try:
        record = row.record()
    except ValueError:
        return None
    return record if isinstance(record, dict) and set(record) == RECORD_KEYS else None


def _seq_of(record: dict[str, Any] | None) -> int | None:
    seq = None if record is None else record["seq"]
    return seq if isinstance(seq, int) and not isinstance(seq, bool) else None


def _body_seq(row: Sealed) -> int | None:
    return _seq_of(_parse(row))


def chunked(items: Iterable[Sealed], size: int) -> Iterator[list[Sealed]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


__all__ = [
    "CHECKPOINT_DOMAIN",
    "GENESIS",
    "RECORD_DOMAIN",
    "REORDER_WINDOW",
    "Checkpoint",
    "Entry",
    "Problem",
    "Report",
    "Sealed",
    "canonical",
    "chunked",
    "iso_time",
    "jsonable",
    "make_checkpoint",
    "record_hash",
    "seal",
    "seal_all",
    "verify",
]
