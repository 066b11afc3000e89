"""The download gate's pure logic: token bucket arithmetic and the download window, on fake clocks."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from agent.sync.gate import DownloadWindowClosed, TokenBucket, TransferGate


class FakeTime:
    def __init__(self) -> None:
        self.t = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


@pytest.mark.parametrize(
    ("takes", "rate", "burst", "expected_s"),
    [
        pytest.param([100], 100, None, 0.0, id="first-burst-is-free"),
        pytest.param([100, 100], 100, None, 1.0, id="second-second-waits"),
        pytest.param([100] * 5, 100, None, 4.0, id="five-at-rate"),
        pytest.param([300, 100], 100, 300, 1.0, id="chunk-above-rate-uses-burst"),
        pytest.param([500, 100], 100, 100, 5.0, id="debt-of-a-big-chunk-is-paid-first"),
    ],
)
async def test_bucket_time(takes: list[int], rate: int, burst: int | None, expected_s: float) -> None:
    fake = FakeTime()
    gate = TransferGate(rate, clock=fake.clock, sleep=fake.sleep)
    if burst is not None:
        assert gate.bucket is not None
        gate.bucket.burst = gate.bucket.tokens = float(burst)
    for n in takes:
        await gate.take(n)
    assert fake.t == pytest.approx(expected_s)
    assert gate.waiting is None


def test_bucket_refills_only_to_burst() -> None:
    fake = FakeTime()
    bucket = TokenBucket(10, 20, clock=fake.clock)
    bucket.spend(20)
    fake.t = 100.0
    assert bucket.delay(20) == 0.0
    bucket.spend(20)
    assert bucket.delay(10) == pytest.approx(1.0)


NOON = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("window", "open_now", "opens_in_s"),
    [
        pytest.param(None, True, 0, id="no-window"),
        pytest.param("11:00-13:00", True, 0, id="inside"),
        pytest.param("13:00-14:00", False, 3600, id="later-today"),
        pytest.param("01:00-05:00", False, 13 * 3600, id="tomorrow"),
        pytest.param("22:00-06:00", False, 10 * 3600, id="wraps-midnight-outside"),
        pytest.param("06:00-06:00", True, 0, id="equal-ends-all-day"),
    ],
)
def test_window(window: str | None, open_now: bool, opens_in_s: int) -> None:
    gate = TransferGate(window=window, now=lambda: NOON)
    assert gate.window_open() is open_now
    assert gate.opens_in_s() == opens_in_s
    if open_now:
        gate.check_window()
        assert gate.waiting is None
    else:
        with pytest.raises(DownloadWindowClosed, match=window or ""):
            gate.check_window()
        assert gate.waiting == "window"


@pytest.mark.parametrize("window", [pytest.param("25:00-01:00", id="hour"), pytest.param("1-2", id="short")])
def test_bad_window_is_refused_naming_it(window: str) -> None:
    with pytest.raises(ValueError, match="download window"):
        TransferGate(window=window)
