"""When the sync loop wakes: only times a round can act on count, and a time already past never
makes the loop spin (each round refreshes the signed metadata from the hub). Pure rules as tables,
then the service's own computation on a real ledger file."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest

from agent.sync.ledger import Failure, FailureBook, Ledger, UnneededBook
from agent.sync.retry import RetryPolicy
from agent.sync.service import SyncService
from agent.sync.wake import MIN_SLEEP_S, actionable_times, sleep_s

NOW = 10_000.0


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        pytest.param([], 900.0, id="nothing-due-refresh-interval"),
        pytest.param([NOW + 60], 60.0, id="future-time-sooner"),
        pytest.param([NOW + 5000], 900.0, id="future-time-later-than-refresh"),
        pytest.param([NOW + 0.1], MIN_SLEEP_S, id="imminent-time-minimum"),
        pytest.param([NOW - 7200], 300.0, id="past-time-waits-the-floor-not-half-a-second"),
        pytest.param([NOW], 300.0, id="time-exactly-now-is-past"),
        pytest.param([NOW - 1, NOW + 30], 30.0, id="future-time-before-floor-wins"),
        pytest.param([NOW - 1, NOW + 600], 300.0, id="floor-before-future-time-wins"),
    ],
)
def test_sleep_s(times: list[float], expected: float) -> None:
    assert sleep_s(NOW, 900.0, 300.0, times) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("refresh", "floor"),
    [pytest.param(0.0, 1.0, id="zero-refresh"), pytest.param(1.0, -1.0, id="negative-floor")],
)
def test_bad_sleep_input_is_a_clear_error(refresh: float, floor: float) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        sleep_s(NOW, refresh, floor, [])


def failure(model: str, next_at: float, basis: str = "B") -> Failure:
    return Failure(model, "1", 1, NOW - 300, next_at, "boom", basis)


@pytest.mark.parametrize(
    ("failures", "deferred", "unneeded", "in_use", "expected"),
    [
        pytest.param([failure("a", 50.0)], [], {}, [], [50.0], id="retry-counts"),
        pytest.param([failure("a", 50.0, "OLD")], [], {}, [], [], id="retry-of-other-deployments"),
        pytest.param([failure("a", 50.0)], ["a"], {}, [], [], id="retry-deferred-by-window"),
        pytest.param([], [], {("m", "1"): 10.0}, [], [3610.0], id="removal-after-grace"),
        pytest.param([], [], {("m", "1"): 10.0}, [("m", "1")], [], id="removal-of-served-version"),
        pytest.param([], [], {("m", "1"): 10.0}, [("m", "2")], [3610.0], id="other-version-served"),
    ],
)
def test_actionable_times(
    failures: list[Failure],
    deferred: list[str],
    unneeded: dict[tuple[str, str], float],
    in_use: list[tuple[str, str]],
    expected: list[float],
) -> None:
    assert actionable_times(failures, "B", deferred, unneeded, 3600.0, in_use) == expected


@pytest.mark.parametrize(
    ("in_use", "deferred", "basis"),
    [
        pytest.param({("old", "1")}, set(), "B", id="unneeded-but-still-served"),
        pytest.param(set(), {"new"}, "B", id="retry-deferred-outside-window"),
        pytest.param(set(), set(), "B", id="past-retry-and-removal-round-could-not-act"),
    ],
)
def test_service_does_not_spin_on_past_times(
    tmp_path: Path, in_use: set[tuple[str, str]], deferred: set[str], basis: str
) -> None:
    """The reviewer's case: an undeployed version still served, past its grace, used to give 0.5 s."""
    ledger = Ledger.open(tmp_path)
    try:
        now = time.time()
        UnneededBook(ledger).replace({("old", "1"): now - 7200})
        FailureBook(ledger).put(Failure("new", "2", 3, now - 900, now - 60, "boom", basis))
        service = SimpleNamespace(
            options=SimpleNamespace(
                refresh_interval_s=900.0, removal_grace_s=3600.0, retry=RetryPolicy(initial_s=300.0)
            ),
            failures=FailureBook(ledger),
            unneeded=UnneededBook(ledger),
            _basis="B",
            _deferred=deferred,
            _in_use=in_use,
            _window_wait=False,
            now=lambda: datetime.fromtimestamp(now, UTC),
        )
        assert SyncService._sleep_s(service) == pytest.approx(300.0)  # type: ignore[arg-type]
    finally:
        ledger.close()
