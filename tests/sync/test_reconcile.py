"""Pure reconcile rules: desired deployments vs installed and served models."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent.sync.reconcile import Activate, Defer, Missing, in_window, plan
from registry.metadata import Deployment, DeploymentEntry

NOON = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
NIGHT = datetime(2026, 1, 1, 2, 30, tzinfo=UTC)


def dep(*entries: DeploymentEntry, window: str | None = None, group: str = "edge") -> Deployment:
    return Deployment(group, entries, window)


WINDOW_CASES = [
    pytest.param(NOON, None, True, id="no-window-always"),
    pytest.param(NIGHT, "02:00-04:00", True, id="inside"),
    pytest.param(NOON, "02:00-04:00", False, id="outside"),
    pytest.param(datetime(2026, 1, 1, 4, 0, tzinfo=UTC), "02:00-04:00", False, id="end-exclusive"),
    pytest.param(datetime(2026, 1, 1, 23, 30, tzinfo=UTC), "23:00-01:00", True, id="wraps-before-midnight"),
    pytest.param(datetime(2026, 1, 1, 0, 30, tzinfo=UTC), "23:00-01:00", True, id="wraps-after-midnight"),
    pytest.param(NOON, "23:00-01:00", False, id="wrapping-window-outside"),
    pytest.param(NOON, "05:00-05:00", True, id="equal-ends-all-day"),
]


@pytest.mark.parametrize(("now", "window", "expected"), WINDOW_CASES)
def test_in_window(now: datetime, window: str | None, expected: bool) -> None:
    assert in_window(now, window) is expected


@pytest.mark.parametrize("window", ["2:00-04:00", "24:00-01:00", "02:00", "", "02:00-04:60"])
def test_bad_window_is_refused(window: str) -> None:
    with pytest.raises(ValueError, match="maintenance window"):
        in_window(NOON, window)


PLAN_CASES = [
    pytest.param(
        [dep(DeploymentEntry("a"))],
        [("a", "1")],
        {},
        None,
        NOON,
        (),
        [Activate("a", "1", True)],
        id="first-install-activates-as-default",
    ),
    pytest.param(
        [dep(DeploymentEntry("a"))],
        [("a", "1"), ("a", "2")],
        {"a": "2"},
        "a",
        NOON,
        (),
        [],
        id="already-serving-newest",
    ),
    pytest.param(
        [dep(DeploymentEntry("a", "1"))],
        [("a", "1"), ("a", "2")],
        {"a": "2"},
        "a",
        NOON,
        (),
        [Activate("a", "1", True)],
        id="pinned-version-rolls-back",
    ),
    pytest.param(
        [dep(DeploymentEntry("a"), window="02:00-04:00")],
        [("a", "1"), ("a", "2")],
        {"a": "1"},
        "a",
        NOON,
        (),
        [Defer("a", "2", "02:00-04:00")],
        id="upgrade-outside-window-deferred",
    ),
    pytest.param(
        [dep(DeploymentEntry("a"), window="02:00-04:00")],
        [("a", "1"), ("a", "2")],
        {"a": "1"},
        "a",
        NIGHT,
        (),
        [Activate("a", "2", True)],
        id="upgrade-inside-window",
    ),
    pytest.param(
        [dep(DeploymentEntry("a"), window="02:00-04:00")],
        [("a", "1")],
        {"demo": "x"},
        "demo",
        NOON,
        (),
        [Activate("a", "1", True)],
        id="urgent-when-no-deployed-model-serves",
    ),
    pytest.param(
        [dep(DeploymentEntry("a"))],
        [],
        {},
        None,
        NOON,
        (),
        [Missing("a", None)],
        id="not-installed-is-missing",
    ),
    pytest.param(
        [dep(DeploymentEntry("a"))],
        [("a", "1"), ("a", "2")],
        {"a": "1"},
        "a",
        NOON,
        [("a", "2")],
        [],
        id="failed-version-not-retried",
    ),
    pytest.param(
        [dep(DeploymentEntry("a"), DeploymentEntry("b", pin=True))],
        [("a", "1"), ("b", "1")],
        {},
        None,
        NOON,
        (),
        [Activate("b", "1", True), Activate("a", "1", False)],
        id="pinned-entry-becomes-default-first",
    ),
    pytest.param(
        [dep(DeploymentEntry("a")), dep(DeploymentEntry("a", "1"), group="other")],
        [("a", "1"), ("a", "2")],
        {},
        None,
        NOON,
        (),
        [Activate("a", "2", True)],
        id="first-group-mention-wins",
    ),
    pytest.param([], [("a", "1")], {}, None, NOON, (), [], id="unmanaged-device-untouched"),
    pytest.param(
        [dep(DeploymentEntry("a"))],
        [("a", "10"), ("a", "9")],
        {},
        None,
        NOON,
        (),
        [Activate("a", "10", True)],
        id="versions-compare-numerically",
    ),
]


@pytest.mark.parametrize(("deps", "installed", "serving", "default", "now", "failed", "expected"), PLAN_CASES)
def test_plan(deps, installed, serving, default, now, failed, expected) -> None:  # type: ignore[no-untyped-def]
    assert plan(deps, installed, serving, default, now, failed) == expected
