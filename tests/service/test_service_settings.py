"""[service] and [metrics] settings: bad values stop start-up with one line naming key and value."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_settings
from agent.errors import ConfigError


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        pytest.param(
            '[service]\nmaintenance_window = "2-4"',
            r"service.maintenance_window = '2-4': expected",
            id="window",
        ),
        pytest.param(
            '[service]\nmaintenance_window = "25:00-01:00"',
            r"maintenance_window = '25:00-01:00'",
            id="hour-25",
        ),
        pytest.param(
            "[service]\njitter_s = -1", r"service.jitter_s = -1: .*greater than or equal to 0", id="jitter"
        ),
        pytest.param(
            "[service]\nintervals_s = { gc = 0.5 }",
            r"service.intervals_s = \{\.\.\.\}: .*'gc'",
            id="interval-too-short",
        ),
        pytest.param("[service]\nnotify = 3", r"service.notify = 3", id="notify-not-bool"),
        pytest.param(
            "[metrics]\nlatency_buckets_s = [1.0, 0.5]",
            r"metrics.latency_buckets_s .*strictly increasing",
            id="buckets",
        ),
        pytest.param("[metrics]\nlatency_buckets_s = []", r"strictly increasing", id="no-buckets"),
        pytest.param("[metrics]\nenable = false", r"metrics.enable = False: unknown setting", id="typo"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, toml: str, match: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(toml + "\n")
    with pytest.raises(ConfigError, match=match) as err:
        load_settings(config)
    assert "\n" not in str(err.value)


def test_good_values(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        '[service]\nmaintenance_window = " 22:00-02:00 "\nintervals_s = { rehash = 43200 }\n'
        "[metrics]\nlatency_buckets_s = [0.1, 1.0]\n"
    )
    s = load_settings(config)
    assert s.service.maintenance_window == "22:00-02:00"
    assert s.service.intervals_s == {"rehash": 43200}
    assert s.metrics.latency_buckets_s == [0.1, 1.0]
