"""CPU seconds (user + system) used by named groups of processes over a measured interval (psutil).

A group is a set of root pids; each root counts with its descendants alive at either snapshot,
plus what its exited, reaped children used (``children_user``/``children_system``: a PostgreSQL
backend that ends during the interval). Invariant: a process is counted in one group only: the
group naming the nearest root above it (the bench process is the parent of the broker it started,
yet the broker counts as the broker's group); a process gone before the first snapshot counts only
through its parent's reaped-children time (which the root's own group then carries).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

import psutil


def _tree(root: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(root)
        return [p, *p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _sample(groups: Mapping[str, list[int]]) -> dict[str, dict[int, float]]:
    roots = {pid for pids in groups.values() for pid in pids}
    out: dict[str, dict[int, float]] = {}
    for name, mine in groups.items():
        got: dict[int, float] = {}
        for root in mine:
            tree = _tree(root)
            # another group's root below this one (a broker started by the bench process) is that
            # group's, with its own descendants
            other = {p.pid for p in tree[1:] if p.pid in roots}
            skip = {q.pid for p in tree if p.pid in other for q in _tree(p.pid)}
            for i, p in enumerate(tree):
                if p.pid in skip:
                    continue
                try:
                    t = p.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                got[p.pid] = t.user + t.system
                if i == 0:  # the root: its reaped children too, under a key of its own
                    got[-p.pid] = t.children_user + t.children_system
        out[name] = got
    return out


@dataclass
class CpuMeter:
    """``start()`` then ``stop()``: CPU seconds per group and wall seconds between them."""

    groups: Mapping[str, list[int]]
    _t0: float = 0.0
    _first: dict[str, dict[int, float]] | None = None

    def start(self) -> None:
        self._first = _sample(self.groups)
        self._t0 = time.perf_counter()

    def stop(self) -> tuple[float, dict[str, float]]:
        wall = time.perf_counter() - self._t0
        assert self._first is not None, "start() first"
        last = _sample(self.groups)
        used: dict[str, float] = {}
        for name, now in last.items():
            before = self._first.get(name, {})
            used[name] = sum(max(0.0, v - before.get(pid, 0.0)) for pid, v in now.items())
        return wall, used


def describe(wall: float, used: Mapping[str, float]) -> str:
    """``name 1.23 s (0.45 cores)`` per group and the total against the machine's cores."""
    parts = [f"{k} {v:.2f} s ({v / wall:.2f} cores)" for k, v in used.items()]
    total = sum(used.values())
    parts.append(f"total {total / wall:.2f} of {os.cpu_count()} cores")
    return ", ".join(parts)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


__all__ = ["CpuMeter", "describe", "load_average"]
