"""When the sync loop wakes for its next round. Pure.

Each round refreshes the signed metadata from the hub, so waking early has a cost. Rule:

- Only times a round can act on count (:func:`actionable_times`): the next retry of a failed
  activation that applies to the current deployments and was not deferred by its maintenance
  window in the last round, and the end of the removal grace of an unneeded (model, version) that
  the pool does not serve.
- The loop sleeps the refresh interval, shortened to the earliest of those times still in the
  future (never below :data:`MIN_SLEEP_S`).
- A time already past when the round ended is one the round could not act on (a delete that
  failed, a retry that became due during the round): it wakes the loop no sooner than ``floor_s``
  (the caller passes the retry backoff base, capped by the refresh interval). So the loop never
  spins on a past time: at most one extra round per ``floor_s``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from agent.sync.ledger import Failure

MIN_SLEEP_S = 0.5


def actionable_times(
    failures: Iterable[Failure],
    basis: str,
    deferred: Iterable[str],
    unneeded: Mapping[tuple[str, str], float],
    grace_s: float,
    in_use: Iterable[tuple[str, str]],
) -> list[float]:
    """Due times a round can act on (see the module rules), in no particular order."""
    held = set(deferred)
    busy = set(in_use)
    times = [f.next_at for f in failures if f.basis == basis and f.model not in held]
    times += [since + grace_s for key, since in unneeded.items() if key not in busy]
    return times


def sleep_s(now: float, refresh_s: float, floor_s: float, times: Iterable[float]) -> float:
    """Seconds to sleep before the next round (see the module rules); never above ``refresh_s``."""
    if refresh_s <= 0 or floor_s <= 0:
        raise ValueError(f"refresh ({refresh_s}) and floor ({floor_s}) must be positive")
    wait = refresh_s
    for t in times:
        wait = min(wait, max(MIN_SLEEP_S, t - now) if t > now else floor_s)
    return wait


__all__ = ["MIN_SLEEP_S", "actionable_times", "sleep_s"]
