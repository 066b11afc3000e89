"""A CPU quota per process: each named process (with its descendants) in a cgroup of its own.

Used by bench/hub_drain_bench.py to emulate hub workers on separate hosts, each with a fixed share
of a core, on one machine. ``quota_groups(fraction)`` finds a writable cgroup cpu controller (v1:
a ``cgroup`` mount with the ``cpu`` option, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; v2: a
``cgroup2`` mount whose ``cgroup.subtree_control`` enables ``cpu``, ``cpu.max``) or refuses with
an error naming what it found. ``place(name, pid)`` makes the group ``<mount>/<prefix>-<name>``,
sets its quota (``fraction`` x the period) and moves the process and its live descendants into it
(threads and children made later inherit the group).

Invariants: every group made is removed on leaving the context, error or not; a process still in
a group then is moved back to the mount's root group first (a cgroup with members cannot be
removed). Nothing else of the hierarchy is changed (no controller is enabled for the caller).
The path and text logic (``parse_mounts``, ``Layout``, ``quota_us``, ``parse_stat``) reads no files.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import psutil

PERIOD_US = 100_000
"""the CFS period: 100 ms, the kernel's default"""
MIN_QUOTA_US = 1_000
"""the kernel refuses a quota under 1 ms"""


def quota_us(fraction: float, period_us: int = PERIOD_US) -> int:
    """The quota in microseconds per period for ``fraction`` of one core (> 1: several cores)."""
    if not fraction > 0:
        raise ValueError(f"CPU fraction must be > 0, got {fraction}")
    q = round(fraction * period_us)
    if q < MIN_QUOTA_US:
        raise ValueError(f"CPU fraction {fraction} is under the kernel's minimum quota ({MIN_QUOTA_US} us)")
    return q


@dataclass(frozen=True)
class Layout:
    """Where the groups go and which files set them, for one cgroup version."""

    version: Literal[1, 2]
    root: Path
    """the mount point of the hierarchy holding the cpu controller; groups are made right under it"""

    def group(self, prefix: str, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"bad cgroup name {name!r}")
        return self.root / f"{prefix}-{name}"

    def limit_writes(self, group: Path, quota: int, period: int = PERIOD_US) -> list[tuple[Path, str]]:
        """The (file, text) writes that put ``quota`` us per ``period`` us on ``group``, in order."""
        if self.version == 1:  # the period first: a quota above the old period is then accepted
            return [(group / "cpu.cfs_period_us", str(period)), (group / "cpu.cfs_quota_us", str(quota))]
        return [(group / "cpu.max", f"{quota} {period}")]

    def procs(self, group: Path) -> Path:
        """The file a pid is written to (moving the whole process), the same in both versions."""
        return group / "cgroup.procs"

    def probe(self) -> Path:
        """The file whose presence shows the cpu controller works here."""
        return self.root / ("cpu.cfs_quota_us" if self.version == 1 else "cgroup.subtree_control")


def parse_mounts(text: str) -> list[Layout]:
    """Candidate layouts from /proc/mounts text: v1 cpu hierarchies first, then cgroup2 mounts."""
    v1: list[Layout] = []
    v2: list[Layout] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        _, where, kind, options = parts[:4]
        if kind == "cgroup" and "cpu" in options.split(","):
            v1.append(Layout(1, Path(where)))
        elif kind == "cgroup2":
            v2.append(Layout(2, Path(where)))
    return v1 + v2


def parse_stat(text: str) -> dict[str, int]:
    """``cpu.stat`` as a mapping (``nr_periods``, ``nr_throttled``, ... ``usage_usec`` in v2)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _usable(layout: Layout) -> str | None:
    """None when groups with a cpu quota can be made under ``layout.root``; else why not."""
    if not layout.probe().exists():
        return f"{layout.probe()} missing"
    if layout.version == 2:
        enabled = layout.probe().read_text().split()
        if "cpu" not in enabled:
            return f"cpu controller not enabled in {layout.probe()} (has: {' '.join(enabled) or 'none'})"
    if not os.access(layout.root, os.W_OK):
        return f"{layout.root} not writable"
    return None


def find_layout(mounts: str | None = None) -> Layout:
    """The first usable layout on this machine, or RuntimeError listing each candidate's problem."""
    text = Path("/proc/mounts").read_text() if mounts is None else mounts
    problems = []
    for layout in parse_mounts(text):
        why = _usable(layout)
        if why is None:
            return layout
        problems.append(f"cgroup v{layout.version} at {layout.root}: {why}")
    raise RuntimeError(
        "no writable cgroup cpu controller (needs root and cgroup v1 cpu or v2 with +cpu): "
        + ("; ".join(problems) or "no cgroup mounts")
    )


@dataclass
class QuotaGroups:
    """The groups made so far; see ``quota_groups``."""

    layout: Layout
    fraction: float
    prefix: str
    made: dict[str, Path] = field(default_factory=dict)

    def place(self, name: str, pid: int) -> Path:
        """Make group ``name`` with the quota and move ``pid`` and its live descendants into it."""
        group = self.layout.group(self.prefix, name)
        group.mkdir()
        self.made[name] = group
        for path, text in self.layout.limit_writes(group, quota_us(self.fraction)):
            path.write_text(text)
        proc = psutil.Process(pid)
        for p in [proc, *proc.children(recursive=True)]:
            self.layout.procs(group).write_text(str(p.pid))
        return group

    def stat(self, name: str) -> dict[str, int]:
        """The group's ``cpu.stat`` now (throttled periods: the quota was reached)."""
        return parse_stat((self.made[name] / "cpu.stat").read_text())

    def remove_all(self) -> list[str]:
        """Move any members back to the root group and remove every group; the problems met."""
        problems = []
        for name, group in list(self.made.items()):
            try:
                for pid in self.layout.procs(group).read_text().split():
                    with suppress(ProcessLookupError):  # it exited meanwhile
                        self.layout.procs(self.layout.root).write_text(pid)
                group.rmdir()
                del self.made[name]
            except OSError as e:
                problems.append(f"{group}: {e}")
        return problems


@contextmanager
def quota_groups(fraction: float, prefix: str, mounts: str | None = None) -> Iterator[QuotaGroups]:
    """Groups holding ``fraction`` of a core each, all removed on leaving (error or not)."""
    quota_us(fraction)  # a bad fraction is refused before anything is made
    groups = QuotaGroups(find_layout(mounts), fraction, prefix)
    try:
        yield groups
    except BaseException:
        problems = groups.remove_all()
        if problems:  # the error under way is the one to see; this one is said beside it
            print(f"cgroups left behind: {'; '.join(problems)}", file=sys.stderr)
        raise
    problems = groups.remove_all()
    if problems:
        raise RuntimeError("cgroups left behind: " + "; ".join(problems))


__all__ = ["Layout", "QuotaGroups", "find_layout", "parse_mounts", "parse_stat", "quota_groups", "quota_us"]
