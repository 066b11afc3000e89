"""The systemd notification protocol (``sd_notify(3)``), written by hand.

A notification is one datagram of newline-separated ``KEY=VALUE`` lines sent to the AF_UNIX
socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). The agent
sends ``READY=1`` once its API socket accepts connections (models may still be loading),
``STATUS=...`` lines as its state changes, ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` while
the event loop is healthy, ``RELOADING=1`` then ``READY=1`` around a configuration reload, and
``STOPPING=1`` when a graceful stop begins.

Invariants: without ``$NOTIFY_SOCKET`` every call is a cheap no-op (:class:`NullNotifier`);
sending never raises (systemd going away must not take the daemon down; a failure is logged once);
the watchdog only pings from the event loop itself, so a blocked loop stops the pings and systemd's
``WatchdogSec=`` restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from fleet.log import get_logger

log = get_logger(__name__)


class Notifier(Protocol):
    """Where service state notifications go."""

    @property
    def enabled(self) -> bool: ...

    def send(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; ``True`` when it was delivered."""
        ...


def _clean(value: str) -> str:
    """A value must stay on its line: newlines would inject other keys."""
    return " ".join(value.split())


class NullNotifier:
    """Not running under systemd (no ``$NOTIFY_SOCKET``): every notification is dropped."""

    enabled = False

    def send(self, *lines: str) -> bool:
        return False


class SocketNotifier:
    """Sends notifications to ``address`` (a filesystem path, or ``@name`` for an abstract socket)."""

    enabled = True

    def __init__(self, address: str) -> None:
        if not address or not (address.startswith("/") or address.startswith("@")):
            raise ValueError(f"NOTIFY_SOCKET must be an absolute path or @abstract name, not {address!r}")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._warned = False

    def send(self, *lines: str) -> bool:
        # One short-lived socket per message, as libsystemd does: nothing to leak or close.
        payload = "\n".join(lines).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("sd_notify_failed", error=exc.strerror or str(exc))
            return False
        return True


def notifier_from_env(env: Mapping[str, str] | None = None) -> NullNotifier | SocketNotifier:
    """The notifier ``$NOTIFY_SOCKET`` asks for, or a :class:`NullNotifier`."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET", "")
    if not address:
        return NullNotifier()
    try:
        return SocketNotifier(address)
    except ValueError as exc:
        log.warning("sd_notify_disabled", error=str(exc))
        return NullNotifier()


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or ``None`` when off.

    ``$WATCHDOG_PID``, when set, must name this process (it may be meant for a parent).
    """
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    raw = env.get("WATCHDOG_USEC", "")
    if not raw:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000


def ready(notifier: Notifier, status: str) -> bool:
    return notifier.send("READY=1", f"STATUS={_clean(status)}", f"MAINPID={os.getpid()}")


def status(notifier: Notifier, text: str) -> bool:
    return notifier.send(f"STATUS={_clean(text)}")


def reloading(notifier: Notifier, text: str = "reloading configuration") -> bool:
    """``RELOADING=1`` with the ``CLOCK_MONOTONIC`` time systemd (``Type=notify-reload``) expects."""
    usec = time.monotonic_ns() // 1000
    return notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}", f"STATUS={_clean(text)}")


def stopping(notifier: Notifier, text: str = "stopping") -> bool:
    return notifier.send("STOPPING=1", f"STATUS={_clean(text)}")


class Watchdog:
    """Pings ``WATCHDOG=1`` every ``interval`` seconds while ``healthy()`` holds.

    Each tick also measures how late the event loop woke it up (``lag_s``): a loop that is blocked
    cannot run this task at all, so the pings stop and systemd restarts the service.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval: float,
        healthy: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval <= 0:
            raise ValueError("watchdog interval must be positive")
        self._notifier = notifier
        self.interval = interval
        self._healthy = healthy
        self._clock = clock
        self.lag_s = 0.0
        self.pings = 0
        self.skipped = 0

    def tick(self, lag_s: float) -> bool:
        """One watchdog period: record the loop lag and ping when healthy."""
        self.lag_s = lag_s
        if not self._healthy():
            self.skipped += 1
            log.warning("watchdog_unhealthy", lag_s=round(lag_s, 3))
            return False
        if self._notifier.send("WATCHDOG=1"):
            self.pings += 1
        return True

    async def run(self) -> None:
        """Tick forever (cancel the task to stop)."""
        self.tick(0.0)
        while True:
            expected = self._clock() + self.interval
            await asyncio.sleep(self.interval)
            self.tick(max(0.0, self._clock() - expected))


class ServiceNotifier:
    """The daemon's side of the protocol: ready, status, watchdog, stopping.

    Lifecycle: :meth:`start` (socket accepting: READY=1, watchdog task, a STATUS= line once the
    models are loaded) -> :meth:`stopping` (STOPPING=1; the watchdog keeps pinging while requests
    drain) -> :meth:`close` (tasks cancelled).
    """

    def __init__(
        self, notifier: Notifier, interval: float | None = None, healthy: Callable[[], bool] = lambda: True
    ) -> None:
        self.notifier = notifier
        self._stopping = False
        # While draining after STOPPING=1 the API socket is closed on purpose: keep pinging.
        self.watchdog = (
            Watchdog(notifier, interval, lambda: self._stopping or healthy()) if interval else None
        )
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_env(cls, enabled: bool = True, healthy: Callable[[], bool] = lambda: True) -> ServiceNotifier:
        """``healthy`` is asked before each WATCHDOG=1 (e.g. "is the API socket still open?")."""
        if not enabled:
            return cls(NullNotifier())
        return cls(notifier_from_env(), watchdog_interval(), healthy)

    def start(self, status_text: str, later: Callable[[], Awaitable[str]] | None = None) -> None:
        ready(self.notifier, status_text)
        loop = asyncio.get_running_loop()
        if self.watchdog is not None:
            self._tasks.append(loop.create_task(self.watchdog.run()))
        if later is not None:
            self._tasks.append(loop.create_task(self._status_after(later)))

    async def _status_after(self, later: Callable[[], Awaitable[str]]) -> None:
        status(self.notifier, await later())

    def status(self, text: str) -> None:
        status(self.notifier, text)

    def reloading(self) -> None:
        """A reload began (``RELOADING=1``); :meth:`reloaded` ends it."""
        reloading(self.notifier)

    def reloaded(self, status_text: str) -> None:
        """A reload ended, applied or refused: ``READY=1`` again."""
        ready(self.notifier, status_text)

    def stopping(self, text: str = "stopping: draining requests") -> None:
        self._stopping = True
        stopping(self.notifier, text)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


__all__ = [
    "NullNotifier",
    "Notifier",
    "ServiceNotifier",
    "SocketNotifier",
    "Watchdog",
    "notifier_from_env",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog_interval",
]
