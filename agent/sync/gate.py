"""When and how fast a box may fetch model bytes: the download window and the rate limit.

One :class:`TransferGate` per box (the fetcher's), shared by every transfer and every source
(MQTT chunks and HTTP mirrors), consulted before each chunk:

- **Download window** (``[hub] download_window``, ``HH:MM-HH:MM`` UTC, the syntax of a
  deployment's ``maintenance_window``, see :func:`agent.sync.reconcile.in_window`): outside it no
  new chunk is asked for. A transfer that finds the window closed stops at a chunk boundary with
  :class:`~agent.sync.errors.TransferError` status ``deferred_download_window``; its verified
  chunks stay in the partial file and the next sync round (woken when the window opens) resumes.
  Metadata is never gated (it is small and says what is wanted).
- **Rate limit** (``[hub] max_download_bytes_per_s``): a token bucket refilled at ``rate`` bytes/s
  holding at most ``burst`` (one second's worth, at least one chunk's length of the caller's
  choosing). :meth:`TransferGate.take` returns once ``min(n, burst)`` tokens are there and
  subtracts ``n`` (the balance may go negative: a chunk larger than the burst is paid off before
  the next one is admitted), so over any interval the bytes admitted are at most
  ``burst + rate * seconds``.

Invariant: :attr:`TransferGate.waiting` names why a transfer waits right now (``window``,
``rate``) or is None; the metrics and the logs read it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from agent.sync.reconcile import in_window, window_bounds


class TokenBucket:
    """``rate`` bytes/s, at most ``burst`` banked; starts full. Pure apart from the clock."""

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)
        self.clock = clock
        self.tokens = self.burst
        self._at = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        self._at = now

    def delay(self, n: int) -> float:
        """Seconds until ``n`` bytes may be admitted (0 = now)."""
        self._refill()
        need = min(float(n), self.burst)
        return 0.0 if self.tokens >= need else (need - self.tokens) / self.rate

    def spend(self, n: int) -> None:
        self._refill()
        self.tokens -= n


class DownloadWindowClosed(Exception):
    """Raised by :meth:`TransferGate.check_window` (callers translate it to a TransferError)."""

    def __init__(self, window: str, opens_in_s: float) -> None:
        super().__init__(f"download window {window} (UTC) is closed; opens in {opens_in_s:.0f} s")
        self.window = window
        self.opens_in_s = opens_in_s


class TransferGate:
    """The box's download window and rate limit (either may be None: no limit)."""

    def __init__(
        self,
        rate: int | None = None,
        window: str | None = None,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window is not None:
            window_bounds(window, "download window")  # ValueError naming it when malformed
        self.window = window
        self.now = now
        self.sleep = sleep
        self.bucket = TokenBucket(rate, clock=clock) if rate else None
        self.waiting: str | None = None
        self.rate_waits = 0
        """Times a chunk had to wait for the rate limit."""
        self.rate_wait_s = 0.0
        self.window_deferrals = 0
        """Transfers stopped (or not started) because the window was closed."""

    @property
    def rate(self) -> int | None:
        return int(self.bucket.rate) if self.bucket is not None else None

    def window_open(self) -> bool:
        return in_window(self.now(), self.window)

    def opens_in_s(self) -> float:
        """Seconds until the window next opens (0 when it is open or there is none)."""
        if self.window is None or self.window_open():
            return 0.0
        start, _end = window_bounds(self.window)
        now = self.now()
        at = now.replace(hour=start.hour, minute=start.minute, second=0, microsecond=0)
        if at <= now:
            at += timedelta(days=1)
        return (at - now).total_seconds()

    def check_window(self) -> None:
        """Raise :class:`DownloadWindowClosed` outside the window (sets ``waiting``)."""
        if self.window_open():
            if self.waiting == "window":
                self.waiting = None
            return
        self.waiting = "window"
        self.window_deferrals += 1
        raise DownloadWindowClosed(self.window or "", self.opens_in_s())

    def burst_for(self, n: int) -> None:
        """Make the bucket hold at least one chunk of ``n`` bytes (else it could never admit it
        without debt; debt is fine, but a burst below a chunk would make every chunk wait)."""
        if self.bucket is not None and self.bucket.burst < n:
            self.bucket.burst = float(n)

    async def take(self, n: int) -> None:
        """Wait until the rate limit admits ``n`` more bytes, then account for them."""
        if self.bucket is None:
            return
        delay = self.bucket.delay(n)
        if delay > 0:
            self.waiting = "rate"
            self.rate_waits += 1
            self.rate_wait_s += delay
            try:
                while (delay := self.bucket.delay(n)) > 0:
                    await self.sleep(delay)
            finally:
                if self.waiting == "rate":
                    self.waiting = None
        self.bucket.spend(n)


__all__ = ["DownloadWindowClosed", "TokenBucket", "TransferGate"]
