"""Helpers of the service tests: a real notify socket that records what the daemon sends."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Message:
    at: float
    """``time.time()`` when the datagram arrived."""
    lines: tuple[str, ...]

    def get(self, key: str) -> str | None:
        for line in self.lines:
            if line.startswith(key + "="):
                return line.split("=", 1)[1]
        return None


class NotifyListener:
    """A bound AF_UNIX datagram socket (what systemd's $NOTIFY_SOCKET is) read by a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self.messages: list[Message] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.messages.append(Message(time.time(), tuple(data.decode().split("\n"))))
                self._cond.notify_all()

    def wait_for(self, key: str, value: str | None = None, timeout: float = 60.0, count: int = 1) -> Message:
        """The ``count``-th message carrying ``key`` (with ``value`` when given)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [m for m in self.messages if m.get(key) is not None and value in (None, m.get(key))]
                if len(hits) >= count:
                    return hits[count - 1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {count}x {key}={value} within {timeout}s: {self.messages}")
                self._cond.wait(left)

    def with_key(self, key: str) -> list[Message]:
        with self._cond:
            return [m for m in self.messages if m.get(key) is not None]

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self._sock.close()


@pytest.fixture
def notify_listener(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    try:
        yield listener
    finally:
        listener.close()
