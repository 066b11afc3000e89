"""What a daemon process holds: open file descriptors and resident memory (from /proc, via psutil)."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable

import psutil


def fd_count(pid: int) -> int:
    return psutil.Process(pid).num_fds()


def fd_targets(pid: int) -> Counter[str]:
    """What each open descriptor points at (``socket:[…]`` normalised to ``socket``), counted."""
    out: Counter[str] = Counter()
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue
        out[target.split(":[", 1)[0] if ":[" in target else target] += 1
    return out


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def settle(read: Callable[[], int], target: int, timeout: float = 5.0, slack: int = 0) -> int:
    """Poll ``read()`` until it is at most ``target + slack`` (connections close asynchronously)."""
    deadline = time.monotonic() + timeout
    value = read()
    while value > target + slack and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


__all__ = ["fd_count", "fd_targets", "rss_bytes", "settle"]
