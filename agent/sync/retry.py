"""When a failed activation is tried again. Pure.

Rules (docs/protocol.md, "Deployments and policies"):
- After the n-th failed attempt at (model, version) the next attempt is due
  ``min(max_s, initial_s * 2**(n-1))`` seconds later, shortened by ``jitter * r`` of itself
  (``r`` uniform in [0, 1), drawn by the caller), so a fleet that failed together does not retry
  together. The delay is never below ``initial_s * (1 - jitter)`` nor above ``max_s``.
- The count restarts at 1 when the version or the deployments (their fingerprint, ``basis``)
  change; a success clears the record.
- A (model, version) is held back (not activated) while its next attempt is not due.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.sync.ledger import Failure
from registry.metadata import Deployment


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    initial_s: float = 300.0
    max_s: float = 21600.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"retry delays need 0 < initial ({self.initial_s}) <= max ({self.max_s})")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"retry jitter must be within [0, 1], got {self.jitter}")


def retry_delay(attempts: int, policy: RetryPolicy, r: float) -> float:
    """Seconds from the ``attempts``-th failure to the next attempt (``r`` in [0, 1))."""
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    if not 0 <= r < 1:
        raise ValueError(f"r must be within [0, 1), got {r}")
    base = min(policy.max_s, policy.initial_s * 2.0 ** min(attempts - 1, 64))
    return base * (1.0 - policy.jitter * r)


def after_failure(
    previous: Failure | None,
    model: str,
    version: str,
    error: str,
    now: float,
    basis: str,
    policy: RetryPolicy,
    r: float,
) -> Failure:
    """The record after a failed attempt at (model, version) at ``now``."""
    same = previous is not None and previous.version == version and previous.basis == basis
    attempts = previous.attempts + 1 if same and previous is not None else 1
    return Failure(model, version, attempts, now, now + retry_delay(attempts, policy, r), error, basis)


def is_due(failure: Failure, now: float) -> bool:
    return now >= failure.next_at


def held_back(failures: Iterable[Failure], now: float, basis: str) -> set[tuple[str, str]]:
    """(model, version) pairs whose retry is not due yet (records of other deployments do not count)."""
    return {(f.model, f.version) for f in failures if f.basis == basis and not is_due(f, now)}


def stale(failures: Mapping[str, Failure], desired: Iterable[str], basis: str) -> list[str]:
    """Models whose record no longer applies: not deployed any more, or the deployments changed."""
    wanted = set(desired)
    return [m for m, f in failures.items() if m not in wanted or f.basis != basis]


def next_due(failures: Iterable[Failure], basis: str) -> float | None:
    """The earliest next attempt among the records that apply, or None."""
    times = [f.next_at for f in failures if f.basis == basis]
    return min(times) if times else None


def deployments_basis(deployments: Iterable[Deployment]) -> str:
    """Fingerprint of the deployments (order-independent)."""
    docs = sorted(d.to_json() for d in deployments)
    return hashlib.sha256(b"\n".join(docs)).hexdigest()[:32]


__all__ = [
    "RetryPolicy",
    "after_failure",
    "deployments_basis",
    "held_back",
    "is_due",
    "next_due",
    "retry_delay",
    "stale",
]
