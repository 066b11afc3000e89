"""The probe replayed against real machines' /proc and /sys snapshots, and its failure behaviour."""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest

from agent.hardware.probe import guarded, parse_auxv, probe, probe_cgroup
from fleet.hardware import GpuInfo, HardwareProfile

MACHINES = Path(__file__).resolve().parent.parent / "fixtures" / "machines"
GIB = 1 << 30
MIB = 1 << 20


def replay(name: str) -> HardwareProfile:
    return probe(MACHINES / name, gpus=lambda: (), onnx_providers=lambda: ("CPUExecutionProvider",))


# name, arch, cpu model, physical, logical, features that must be present, features that must be absent
CPU_CASES = [
    ("rpi4-4gb", "aarch64", "Cortex-A72", 4, 4, {"neon"}, {"dotprod", "i8mm"}),
    ("rpi5-8gb", "aarch64", "Cortex-A76", 4, 4, {"neon", "dotprod", "fp16"}, {"i8mm", "sve"}),
    ("jetson-orin-nano-8gb", "aarch64", "Cortex-A78AE", 6, 6, {"neon", "dotprod"}, {"sve"}),
    (
        "x86-nuc-16gb",
        "x86_64",
        "Intel(R) Core(TM) i5-10210U CPU @ 1.60GHz",
        4,
        8,
        {"avx2", "fma", "f16c"},
        {"avx512f"},
    ),
    (
        "container-1g",
        "x86_64",
        "Intel(R) Xeon(R) Silver 4214R CPU @ 2.40GHz",
        4,
        8,
        {"avx512f", "avx2"},
        set(),
    ),
]


@pytest.mark.parametrize(
    ("name", "arch", "model", "physical", "logical", "present", "absent"),
    CPU_CASES,
    ids=[c[0] for c in CPU_CASES],
)
def test_cpu(
    name: str, arch: str, model: str, physical: int, logical: int, present: set[str], absent: set[str]
) -> None:
    cpu = replay(name).cpu
    assert (cpu.arch, cpu.model, cpu.physical_cores, cpu.logical_cores) == (arch, model, physical, logical)
    assert present <= cpu.features
    assert not absent & cpu.features


# name, cgroup version, limit, usable memory (bytes, to the MiB), throttled, device model
MEMORY_CASES = [
    ("rpi4-4gb", "v2", None, 3275196 * 1024, True, "Raspberry Pi 4 Model B Rev 1.4"),
    ("rpi5-8gb", "v2", None, 7512688 * 1024, False, "Raspberry Pi 5 Model B Rev 1.0"),
    ("jetson-orin-nano-8gb", "v2", None, 6310212 * 1024, False, "NVIDIA Jetson Orin Nano Developer Kit"),
    ("x86-nuc-16gb", "v2", None, 14406312 * 1024, None, "Intel(R) Client Systems NUC10i5FNH"),
    # /proc/meminfo shows the 64 GB host: the cgroup limit minus the working set is what counts.
    ("container-1g", "v2", GIB, GIB - (31457280 - 2097152), None, "unknown"),
    ("container-512m", "v1", 512 * MIB, 512 * MIB - (27262976 - 2097152), None, "unknown"),
]


@pytest.mark.parametrize(
    ("name", "version", "limit", "usable", "throttled", "device"),
    MEMORY_CASES,
    ids=[c[0] for c in MEMORY_CASES],
)
def test_memory_cgroup_thermal(
    name: str, version: str, limit: int | None, usable: int, throttled: bool | None, device: str
) -> None:
    profile = replay(name)
    assert profile.cgroup.version == version
    assert profile.cgroup.limit_bytes == limit
    assert profile.usable_memory_bytes == usable
    assert profile.throttled is throttled
    assert profile.device_model == device
    assert profile.memory.total_bytes is not None


def test_accelerators_power_and_quota() -> None:
    pi = replay("rpi5-8gb")
    assert [(a.kind, a.path, a.driver) for a in pi.accelerators] == [("dri", "/dev/dri/renderD128", "v3d")]
    assert pi.thermal[0].name == "cpu-thermal" and pi.thermal[0].temp_c == pytest.approx(52.65)
    nuc = replay("x86-nuc-16gb")
    assert nuc.power.source == "ac"
    assert nuc.accelerators[0].driver == "i915"
    container = replay("container-1g")
    assert container.cpu.cpu_quota == 2.0
    assert container.cpu.usable_cores == 2
    jetson = replay("jetson-orin-nano-8gb")
    assert [z.passive_c for z in jetson.thermal] == [99.0, 99.0, 99.0]
    assert jetson.memory.swap_total_bytes == 3810176 * 1024


def test_replayed_root_does_not_probe_this_machines_libraries() -> None:
    profile = probe(MACHINES / "rpi4-4gb")
    assert profile.gpus == () and profile.onnx_providers == ()
    assert "gpus: not probed (replayed root)" in profile.notes


def test_empty_root_gives_unknown_never_a_crash(tmp_path: Path) -> None:
    profile = probe(tmp_path)
    assert profile.cpu.arch == "unknown"
    assert profile.memory.total_bytes is None
    assert profile.usable_memory_bytes is None
    assert profile.throttled is None
    assert profile.power.source == "unknown"
    assert any(n.startswith("cpu: proc/cpuinfo") for n in profile.notes)
    assert any(n.startswith("memory: proc/meminfo") for n in profile.notes)
    json.dumps(profile.to_dict())


def test_live_probe_is_complete_and_serialisable(tmp_path: Path) -> None:
    profile = probe(store_dir=tmp_path / "models")
    assert profile.cpu.arch != "unknown"
    assert profile.memory.total_bytes and profile.memory.total_bytes > 0
    assert profile.disk_free_bytes and profile.disk_free_bytes > 0
    assert "CPUExecutionProvider" in profile.onnx_providers
    assert json.loads(json.dumps(profile.to_dict()))["cpu"]["arch"] == profile.cpu.arch


@pytest.mark.parametrize(
    ("fn", "note"),
    [
        (lambda: time.sleep(5), "slow: timed out after 0.2s"),
        (lambda: 1 / 0, "slow: ZeroDivisionError: division by zero"),
    ],
    ids=["timeout", "exception"],
)
def test_guarded_falls_back(fn: object, note: str) -> None:
    notes: list[str] = []
    assert callable(fn)
    started = time.monotonic()
    assert guarded("slow", fn, "unknown", 0.2, notes) == "unknown"
    assert time.monotonic() - started < 2.0
    assert notes == [note]


def test_hanging_library_probe_does_not_block(tmp_path: Path) -> None:
    def hang() -> tuple[GpuInfo, ...]:
        time.sleep(5)
        return ()

    started = time.monotonic()
    profile = probe(
        MACHINES / "rpi5-8gb", gpus=hang, onnx_providers=lambda: (), timeout_s=0.3, library_timeout_s=0.3
    )
    assert time.monotonic() - started < 3.0
    assert "gpus: timed out after 0.3s" in profile.notes
    assert profile.cpu.model == "Cortex-A76"


def test_auxv_when_cpuinfo_lists_no_features(tmp_path: Path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/cpuinfo").write_text("processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd0b\n")
    hwcap = 1 << 1 | 1 << 20  # asimd, asimddp
    hwcap2 = 1 << 13  # i8mm
    (tmp_path / "proc/self/auxv").write_bytes(struct.pack("<6Q", 16, hwcap, 26, hwcap2, 0, 0))
    profile = probe(tmp_path, gpus=lambda: (), onnx_providers=lambda: ())
    assert profile.cpu.features == {"neon", "dotprod", "i8mm"}
    assert profile.cpu.arch == "aarch64"
    assert parse_auxv(b"") == frozenset()


def test_tightest_limit_on_the_path_applies(tmp_path: Path) -> None:
    # systemd MemoryMax on the slice, none on the service: the slice's limit bounds the agent.
    root = tmp_path / "m"
    shutil.copytree(MACHINES / "rpi4-4gb", root)
    (root / "sys/fs/cgroup/system.slice/memory.max").write_text("805306368\n")
    info, quota = probe_cgroup(root)
    assert info.limit_bytes == 768 * MIB
    assert quota is None


def test_hot_zone_means_throttled(tmp_path: Path) -> None:
    root = tmp_path / "m"
    shutil.copytree(MACHINES / "jetson-orin-nano-8gb", root)
    (root / "sys/class/thermal/thermal_zone2/temp").write_text("99500\n")
    profile = probe(root, gpus=lambda: (), onnx_providers=lambda: ())
    assert profile.throttled is True
    assert [z.hot for z in profile.thermal] == [False, False, True]
