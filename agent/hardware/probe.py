"""Probe this machine (or a replayed snapshot of another one) into a :class:`HardwareProfile`.

Sources: ``/proc/cpuinfo`` (or the auxiliary vector ``/proc/self/auxv`` on ARM kernels that list no
features), ``/proc/meminfo``, ``/proc/self/cgroup`` with the cgroup v2 or v1 hierarchy under
``/sys/fs/cgroup``, ``/sys/class/thermal``, the Raspberry Pi firmware's ``get_throttled``,
``/sys/class/power_supply``, ``/dev/accel*`` and ``/dev/dri`` with their drivers from ``/sys/class``,
the device tree or DMI for the board name; live only: psutil (core count fallback), the disk of
the model store, NVML through an optional ``pynvml`` import, and onnxruntime's execution providers.

Invariants:

* Every file is read under ``root`` (injectable: tests replay snapshots of other machines) with a
  size bound; nothing outside ``root`` is read except by the live-only probes, which are skipped
  (recorded as "not probed") when ``root`` is not ``/`` unless the caller passes them in.
* Every probe runs in its own daemon thread with a timeout. A probe that raises, times out or finds
  nothing yields its "unknown" value and a line in ``profile.notes``; ``probe()`` never raises.
"""

from __future__ import annotations

import platform
import re
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from fleet.hardware import (
    UNKNOWN,
    Accelerator,
    CgroupInfo,
    CpuInfo,
    GpuInfo,
    HardwareProfile,
    MemoryInfo,
    PowerInfo,
    PowerSource,
    ThermalZone,
)

T = TypeVar("T")
MAX_FILE_BYTES = 1 << 20
UNLIMITED_V1 = 1 << 62
"""cgroup v1 reports "no limit" as a page-rounded 2^63-1; anything this large means unlimited."""

X86_FEATURES = frozenset(
    {"sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "amx_int8", "amx_bf16", "amx_tile"}
)
ARM_FEATURE_NAMES = {
    "neon": "neon",
    "asimd": "neon",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "sve": "sve",
    "sve2": "sve2",
    "fphp": "fp16",
    "asimdhp": "fp16",
    "bf16": "bf16",
}
# arm64 AT_HWCAP / AT_HWCAP2 bits (linux/arch/arm64/include/uapi/asm/hwcap.h).
AT_HWCAP, AT_HWCAP2 = 16, 26
HWCAP_BITS = {1: "asimd", 9: "fphp", 10: "asimdhp", 20: "asimddp", 22: "sve"}
HWCAP2_BITS = {1: "sve2", 13: "i8mm", 14: "bf16"}
ARM_PARTS = {
    ("0x41", "0xd03"): "Cortex-A53",
    ("0x41", "0xd04"): "Cortex-A35",
    ("0x41", "0xd05"): "Cortex-A55",
    ("0x41", "0xd07"): "Cortex-A57",
    ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd0b"): "Cortex-A76",
    ("0x41", "0xd0c"): "Neoverse-N1",
    ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd41"): "Cortex-A78",
    ("0x41", "0xd42"): "Cortex-A78AE",
    ("0x41", "0xd49"): "Neoverse-N2",
}


class ProbeUnavailable(Exception):
    """A probe has nothing to read here (file absent, library not installed)."""


def _head(path: Path, limit: int) -> str:
    """At most ``limit`` bytes of ``path`` as text (undecodable bytes replaced); OSError as it is."""
    with path.open("rb") as fh:
        return fh.read(limit).decode("utf-8", "replace")


def read_text(root: Path, rel: str, limit: int = MAX_FILE_BYTES) -> str:
    """Read ``root/rel`` (at most ``limit`` bytes) as text; raise :class:`ProbeUnavailable` if absent."""
    try:
        return _head(root / rel.lstrip("/"), limit)
    except OSError as exc:
        raise ProbeUnavailable(f"{rel}: {exc.strerror or exc}") from None


def _maybe(root: Path, rel: str) -> str | None:
    try:
        return read_text(root, rel).strip()
    except ProbeUnavailable:
        return None


# --- CPU ------------------------------------------------------------------------------------------


def _cpuinfo_blocks(text: str) -> list[dict[str, str]]:
    blocks: list[dict[str, str]] = [{}]
    for line in text.splitlines():
        if not line.strip():
            if blocks[-1]:
                blocks.append({})
            continue
        key, sep, value = line.partition(":")
        if sep:
            blocks[-1][key.strip().lower()] = value.strip()
    return [b for b in blocks if b]


def parse_auxv(data: bytes) -> frozenset[str]:
    """arm64 feature names from the auxiliary vector (pairs of native unsigned longs)."""
    found: set[str] = set()
    for off in range(0, len(data) - 15, 16):
        key, value = struct.unpack_from("<QQ", data, off)
        table = HWCAP_BITS if key == AT_HWCAP else HWCAP2_BITS if key == AT_HWCAP2 else None
        if table is not None:
            found.update(name for bit, name in table.items() if value >> bit & 1)
    return frozenset(ARM_FEATURE_NAMES.get(f, f) for f in found)


def _range_count(text: str) -> int:
    count = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            count += int(hi) - int(lo) + 1 if hi.isdigit() else 1
    return count


def probe_cpu(root: Path, live: bool) -> CpuInfo:
    blocks = _cpuinfo_blocks(read_text(root, "proc/cpuinfo"))
    processors = [b for b in blocks if "processor" in b]
    logical = len(processors) or None
    online = _maybe(root, "sys/devices/system/cpu/online")
    if online:
        logical = _range_count(online) or logical
    first = processors[0] if processors else (blocks[0] if blocks else {})
    merged = {k: v for b in blocks for k, v in b.items()}
    features: frozenset[str]
    physical: int | None
    if "flags" in first:
        flags = set(first["flags"].split())
        features = frozenset(f for f in flags if f in X86_FEATURES or f.startswith("avx512"))
        arch = "x86_64" if "lm" in flags else "i686"
        model = first.get("model name", UNKNOWN)
        cores = {(b.get("physical id", "0"), b.get("core id", str(i))) for i, b in enumerate(processors)}
        physical = len(cores) or None
    else:
        raw = set(merged.get("features", "").split())
        features = frozenset(ARM_FEATURE_NAMES[f] for f in raw if f in ARM_FEATURE_NAMES)
        version = merged.get("cpu architecture", "")
        arch = "aarch64" if version == "8" or "asimd" in raw else "armv7l" if version == "7" else UNKNOWN
        part = ARM_PARTS.get((merged.get("cpu implementer", ""), merged.get("cpu part", "")))
        model = part or merged.get("model name") or merged.get("hardware") or UNKNOWN
        physical = logical  # no SMT on the ARM cores of edge boards
        if not features:
            try:
                with (root / "proc/self/auxv").open("rb") as fh:
                    auxv = fh.read(4096)
            except OSError:
                auxv = b""
            features = parse_auxv(auxv)
            if features and arch == UNKNOWN:
                arch = "aarch64"
    if live:
        arch = platform.machine() or arch
        if physical is None:
            import psutil

            physical = psutil.cpu_count(logical=False)
    return CpuInfo(arch=arch, model=model, physical_cores=physical, logical_cores=logical, features=features)


# --- memory and cgroups ---------------------------------------------------------------------------


def probe_memory(root: Path) -> MemoryInfo:
    values: dict[str, int] = {}
    for line in read_text(root, "proc/meminfo").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    if "MemTotal" not in values:
        raise ProbeUnavailable("proc/meminfo has no MemTotal")
    available = values.get("MemAvailable")
    if available is None:  # kernels before 3.14
        available = values.get("MemFree", 0) + values.get("Cached", 0) + values.get("Buffers", 0)
    return MemoryInfo(
        total_bytes=values["MemTotal"],
        available_bytes=available,
        swap_total_bytes=values.get("SwapTotal"),
        swap_free_bytes=values.get("SwapFree"),
    )


def _cgroup_paths(root: Path) -> tuple[str | None, str | None, str | None]:
    """(v2 path, v1 memory path, v1 cpu path) of this process from ``/proc/self/cgroup``."""
    v2 = v1_mem = v1_cpu = None
    for line in read_text(root, "proc/self/cgroup").splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        names = controllers.split(",")
        if hier == "0" and controllers == "":
            v2 = path
        if "memory" in names:
            v1_mem = path
        if "cpu" in names:
            v1_cpu = path
    return v2, v1_mem, v1_cpu


def _chain(base: Path, rel: str) -> list[Path]:
    """The cgroup directory (or the mount root, inside a cgroup namespace) and its ancestors to base."""
    here = base / rel.strip("/")
    if not here.is_dir():
        here = base
    chain = [here]
    while here != base and base in here.parents:
        here = here.parent
        chain.append(here)
    return chain


def _int_file(path: Path) -> int | None:
    try:
        text = _head(path, 64).strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in _head(path, MAX_FILE_BYTES).splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def probe_cgroup(root: Path) -> tuple[CgroupInfo, float | None]:
    """The memory limit/usage and the CPU quota that apply to this process."""
    v2, v1_mem, v1_cpu = _cgroup_paths(root)
    base2 = root / "sys/fs/cgroup"
    if v2 is not None and (base2 / "cgroup.controllers").is_file():
        chain = _chain(base2, v2)
        limits = [v for d in chain if (v := _int_file(d / "memory.max")) is not None]
        current = _int_file(chain[0] / "memory.current")
        usage = None
        if current is not None:
            usage = max(0, current - _stat_value(chain[0] / "memory.stat", "inactive_file"))
        quota: float | None = None
        for d in chain:
            try:
                text, _, period = _head(d / "cpu.max", 64).strip().partition(" ")
            except OSError:
                continue
            if text.isdigit() and period.isdigit() and int(period):
                value = int(text) / int(period)
                quota = value if quota is None else min(quota, value)
        info = CgroupInfo("v2", v2, min(limits) if limits else None, usage)
        return info, quota
    if v1_mem is not None:
        base1 = root / "sys/fs/cgroup/memory"
        chain = _chain(base1, v1_mem)
        limits = [
            v for d in chain if (v := _int_file(d / "memory.limit_in_bytes")) is not None and v < UNLIMITED_V1
        ]
        raw = _int_file(chain[0] / "memory.usage_in_bytes")
        usage = None
        if raw is not None:
            usage = max(0, raw - _stat_value(chain[0] / "memory.stat", "total_inactive_file"))
        quota = None
        for cpu_dir in ("sys/fs/cgroup/cpu,cpuacct", "sys/fs/cgroup/cpu"):
            base_cpu = root / cpu_dir
            if base_cpu.is_dir() and v1_cpu is not None:
                d = _chain(base_cpu, v1_cpu)[0]
                us, period_us = _int_file(d / "cpu.cfs_quota_us"), _int_file(d / "cpu.cfs_period_us")
                if us is not None and us > 0 and period_us:
                    quota = us / period_us
                break
        return CgroupInfo("v1", v1_mem, min(limits) if limits else None, usage), quota
    return CgroupInfo("none", "/", None, None), None


# --- disk, accelerators, GPUs, ONNX ---------------------------------------------------------------


def probe_disk(store_dir: Path) -> int:
    here = store_dir.absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    return shutil.disk_usage(here).free


def _driver(root: Path, sys_class: str) -> str:
    text = _maybe(root, f"{sys_class}/device/uevent") or ""
    for line in text.splitlines():
        if line.startswith("DRIVER="):
            return line.removeprefix("DRIVER=")
    return UNKNOWN


def probe_accelerators(root: Path) -> tuple[Accelerator, ...]:
    found: list[Accelerator] = []
    dev = root / "dev"
    for path in sorted([*dev.glob("accel*"), *dev.glob("accel/accel*")]):
        if path.is_dir():
            continue
        driver = _driver(root, f"sys/class/accel/{path.name}")
        found.append(Accelerator("accel", f"/dev/{path.relative_to(dev)}", driver))
    for path in sorted(dev.glob("dri/renderD*")):
        found.append(Accelerator("dri", f"/dev/dri/{path.name}", _driver(root, f"sys/class/drm/{path.name}")))
    return tuple(found)


def nvml_gpus() -> tuple[GpuInfo, ...]:
    """NVIDIA GPUs through NVML; :class:`ProbeUnavailable` when pynvml or the driver is absent."""
    try:
        import pynvml
    except ImportError:
        raise ProbeUnavailable("pynvml is not installed") from None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # pynvml.NVMLError: no driver / no device
        raise ProbeUnavailable(f"NVML unavailable: {exc}") from None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GpuInfo(
                    vendor="nvidia",
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_total_bytes=int(mem.total),
                    memory_free_bytes=int(mem.free),
                )
            )
        return tuple(gpus)
    finally:
        pynvml.nvmlShutdown()


def ort_providers() -> tuple[str, ...]:
    try:
        import onnxruntime
    except ImportError:
        raise ProbeUnavailable("onnxruntime is not installed") from None
    return tuple(str(p) for p in onnxruntime.get_available_providers())


# --- thermal, power, board ------------------------------------------------------------------------


def _millideg(text: str | None) -> float | None:
    if text is None or not text.lstrip("-").isdigit():
        return None
    return int(text) / 1000.0


def probe_thermal(root: Path) -> tuple[ThermalZone, ...]:
    zones = []
    base = root / "sys/class/thermal"
    for zone in sorted(base.glob("thermal_zone*"), key=lambda p: int(p.name[12:] or 0)):
        rel = f"sys/class/thermal/{zone.name}"
        passive: list[float] = []
        critical: list[float] = []
        for trip in sorted(zone.glob("trip_point_*_type")):
            kind = _maybe(root, f"{rel}/{trip.name}")
            temp = _millideg(_maybe(root, f"{rel}/{trip.name.replace('_type', '_temp')}"))
            if temp is None or temp <= 0:
                continue
            if kind == "passive":
                passive.append(temp)
            elif kind in ("critical", "hot"):
                critical.append(temp)
        zones.append(
            ThermalZone(
                name=_maybe(root, f"{rel}/type") or zone.name,
                temp_c=_millideg(_maybe(root, f"{rel}/temp")),
                passive_c=min(passive) if passive else None,
                critical_c=min(critical) if critical else None,
            )
        )
    return tuple(zones)


def probe_firmware_throttled(root: Path) -> bool:
    """Raspberry Pi firmware: bits 1-3 of ``get_throttled`` = capped, throttled, soft limit now."""
    for pattern in ("sys/devices/platform/*/get_throttled", "sys/devices/platform/*/*/get_throttled"):
        for path in sorted(root.glob(pattern)):
            text = _head(path, 32).strip().lower().removeprefix("0x")
            if re.fullmatch(r"[0-9a-f]+", text):
                return bool(int(text, 16) & 0b1110)
    raise ProbeUnavailable("no firmware throttling flags")


def probe_power(root: Path) -> PowerInfo:
    base = root / "sys/class/power_supply"
    supplies = sorted(base.iterdir()) if base.is_dir() else []
    if not supplies:
        raise ProbeUnavailable("no power supplies in sys/class/power_supply")
    on_mains = False
    discharging = False
    percent: float | None = None
    for supply in supplies:
        rel = f"sys/class/power_supply/{supply.name}"
        kind = _maybe(root, f"{rel}/type")
        if kind in ("Mains", "USB", "USB_C", "USB_PD") and _maybe(root, f"{rel}/online") == "1":
            on_mains = True
        if kind == "Battery":
            cap = _maybe(root, f"{rel}/capacity")
            percent = float(cap) if cap and cap.isdigit() else percent
            discharging = discharging or _maybe(root, f"{rel}/status") == "Discharging"
    source: PowerSource = "ac" if on_mains else "battery" if discharging else "unknown"
    return PowerInfo(source, percent)


def probe_device_model(root: Path) -> str:
    for rel in ("proc/device-tree/model", "sys/firmware/devicetree/base/model"):
        text = _maybe(root, rel)
        if text:
            return text.strip("\x00").strip()
    vendor = _maybe(root, "sys/class/dmi/id/sys_vendor")
    product = _maybe(root, "sys/class/dmi/id/product_name")
    name = " ".join(p for p in (vendor, product) if p)
    if not name:
        raise ProbeUnavailable("no device tree model or DMI product name")
    return name


def measure_bandwidth(mib: int = 64, repeats: int = 3) -> float:
    """Memory copy bandwidth in GB/s (read + write bytes) over a buffer larger than the caches."""
    import numpy as np

    src = np.ones(mib << 18, dtype=np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


# --- the runner -----------------------------------------------------------------------------------


def guarded(name: str, fn: Callable[[], T], fallback: T, timeout_s: float, notes: list[str]) -> T:
    """Run ``fn`` in a daemon thread; on timeout or any exception return ``fallback`` and add a note."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except ProbeUnavailable as exc:
            box["note"] = str(exc)
        except Exception as exc:  # a probe must never crash the agent
            box["note"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=target, name=f"probe-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        notes.append(f"{name}: timed out after {timeout_s:g}s")
        return fallback
    if "value" in box:
        return box["value"]  # type: ignore[return-value]
    notes.append(f"{name}: {box.get('note', 'failed')}")
    return fallback


def probe(
    root: Path = Path("/"),
    *,
    store_dir: Path | None = None,
    timeout_s: float = 2.0,
    library_timeout_s: float = 20.0,
    gpus: Callable[[], tuple[GpuInfo, ...]] | None = None,
    onnx_providers: Callable[[], tuple[str, ...]] | None = None,
    bandwidth_gbps: float | None = None,
) -> HardwareProfile:
    """Probe the machine under ``root``. Never raises; failed probes are listed in ``notes``.

    ``gpus`` and ``onnx_providers`` default to NVML and onnxruntime when ``root`` is ``/``, and are
    not probed for a replayed root (they would describe this machine, not the snapshot). They get
    ``library_timeout_s``: importing onnxruntime takes seconds on a small or busy board, which is
    slow but not stuck; file probes get ``timeout_s``.
    """
    live = root == Path("/")
    notes: list[str] = []

    def run(name: str, fn: Callable[[], T], fallback: T) -> T:
        return guarded(name, fn, fallback, timeout_s, notes)

    cpu = run("cpu", lambda: probe_cpu(root, live), CpuInfo())
    no_cgroup: tuple[CgroupInfo, float | None] = (CgroupInfo(), None)
    cgroup, quota = run("cgroup", lambda: probe_cgroup(root), no_cgroup)
    if quota is not None:
        cpu = CpuInfo(cpu.arch, cpu.model, cpu.physical_cores, cpu.logical_cores, cpu.features, quota)
    no_zones: tuple[ThermalZone, ...] = ()
    zones = run("thermal", lambda: probe_thermal(root), no_zones)
    unknown_flag: bool | None = None
    firmware = run("throttle_flags", lambda: probe_firmware_throttled(root), unknown_flag)
    judged = [z.hot for z in zones if z.temp_c is not None and z.passive_c is not None]
    throttled = firmware if firmware is not None else (any(judged) if judged else None)
    gpu_fn = gpus if gpus is not None else (nvml_gpus if live else None)
    ort_fn = onnx_providers if onnx_providers is not None else (ort_providers if live else None)
    if gpu_fn is None:
        notes.append("gpus: not probed (replayed root)")
    if ort_fn is None:
        notes.append("onnx_providers: not probed (replayed root)")
    disk = None
    if store_dir is not None:
        disk = run("disk", lambda: probe_disk(store_dir), None)
    return HardwareProfile(
        cpu=cpu,
        memory=run("memory", lambda: probe_memory(root), MemoryInfo()),
        cgroup=cgroup,
        disk_free_bytes=disk,
        gpus=guarded("gpus", gpu_fn, (), library_timeout_s, notes) if gpu_fn else (),
        accelerators=run("accelerators", lambda: probe_accelerators(root), ()),
        onnx_providers=guarded("onnx_providers", ort_fn, (), library_timeout_s, notes) if ort_fn else (),
        thermal=zones,
        throttled=throttled,
        power=run("power", lambda: probe_power(root), PowerInfo()),
        memory_bandwidth_gbps=bandwidth_gbps,
        device_model=run("device_model", lambda: probe_device_model(root), UNKNOWN),
        notes=tuple(notes),
    )


__all__ = [
    "ProbeUnavailable",
    "guarded",
    "measure_bandwidth",
    "nvml_gpus",
    "ort_providers",
    "parse_auxv",
    "probe",
    "probe_accelerators",
    "probe_cgroup",
    "probe_cpu",
    "probe_device_model",
    "probe_disk",
    "probe_firmware_throttled",
    "probe_memory",
    "probe_power",
    "probe_thermal",
    "read_text",
]
