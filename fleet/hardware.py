"""Plain data describing a machine, as the probe saw it.

Invariants: every field has a value meaning "unknown" (``None``, ``"unknown"`` or an empty tuple) so
that a probe that failed never prevents building a profile; ``notes`` says which probes failed and
why. Sizes are bytes, temperatures degrees Celsius, bandwidth GB/s (10^9 bytes per second).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

UNKNOWN = "unknown"

PowerSource = Literal["ac", "battery", "unknown"]


@dataclass(frozen=True, slots=True)
class CpuInfo:
    arch: str = UNKNOWN
    """``x86_64``, ``aarch64``, ``armv7l`` or ``unknown``."""
    model: str = UNKNOWN
    physical_cores: int | None = None
    logical_cores: int | None = None
    features: frozenset[str] = frozenset()
    """Normalised SIMD features: avx, avx2, avx512f, ..., fma, f16c, avx_vnni, neon, dotprod, i8mm, sve."""
    cpu_quota: float | None = None
    """CPUs allowed by the cgroup (``cpu.max`` / ``cfs_quota_us``); ``None`` when unlimited or unknown."""

    @property
    def usable_cores(self) -> int | None:
        cores = self.physical_cores or self.logical_cores
        if cores is None:
            return None
        if self.cpu_quota is not None:
            return max(1, min(cores, int(self.cpu_quota)))
        return cores


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    total_bytes: int | None = None
    available_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_free_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class CgroupInfo:
    version: Literal["v1", "v2", "none", "unknown"] = "unknown"
    path: str = UNKNOWN
    limit_bytes: int | None = None
    """The tightest memory limit on the way from this process's cgroup to the root; None = unlimited."""
    usage_bytes: int | None = None
    """Working set: usage minus inactive file cache (what the OOM killer would not reclaim first)."""


@dataclass(frozen=True, slots=True)
class GpuInfo:
    vendor: str
    name: str
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Accelerator:
    kind: str
    """``accel`` (a /dev/accel* compute accelerator), ``dri`` (a DRM render node)."""
    path: str
    driver: str = UNKNOWN


@dataclass(frozen=True, slots=True)
class ThermalZone:
    name: str
    temp_c: float | None
    passive_c: float | None = None
    critical_c: float | None = None

    @property
    def hot(self) -> bool:
        """At or above its first passive trip point: the kernel is (or is about to start) throttling."""
        return self.temp_c is not None and self.passive_c is not None and self.temp_c >= self.passive_c


@dataclass(frozen=True, slots=True)
class PowerInfo:
    source: PowerSource = "unknown"
    battery_percent: float | None = None


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """Everything selection needs to know about this box."""

    cpu: CpuInfo = CpuInfo()
    memory: MemoryInfo = MemoryInfo()
    cgroup: CgroupInfo = CgroupInfo()
    disk_free_bytes: int | None = None
    gpus: tuple[GpuInfo, ...] = ()
    accelerators: tuple[Accelerator, ...] = ()
    onnx_providers: tuple[str, ...] = ()
    thermal: tuple[ThermalZone, ...] = ()
    throttled: bool | None = None
    """True when the kernel or firmware reports throttling now; None when it cannot tell."""
    power: PowerInfo = PowerInfo()
    memory_bandwidth_gbps: float | None = None
    """Measured (``edge-agent bench``) or None; selection then falls back to a per-arch guess."""
    device_model: str = UNKNOWN
    """The board, from the device tree or DMI (``Raspberry Pi 5 Model B Rev 1.0``)."""
    notes: tuple[str, ...] = field(default=())

    @property
    def usable_memory_bytes(self) -> int | None:
        """What a new model may use: available memory, capped by the cgroup's remaining room."""
        candidates: list[int] = []
        if self.memory.available_bytes is not None:
            candidates.append(self.memory.available_bytes)
        if self.cgroup.limit_bytes is not None:
            candidates.append(max(0, self.cgroup.limit_bytes - (self.cgroup.usage_bytes or 0)))
        return min(candidates) if candidates else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cpu"]["features"] = sorted(self.cpu.features)
        data["usable_memory_bytes"] = self.usable_memory_bytes
        return data


__all__ = [
    "UNKNOWN",
    "Accelerator",
    "CgroupInfo",
    "CpuInfo",
    "GpuInfo",
    "HardwareProfile",
    "MemoryInfo",
    "PowerInfo",
    "PowerSource",
    "ThermalZone",
]
