"""Which llama.cpp build is right for this CPU: build profiles, and whether a build may run here.

Pure core (``isa_features``, ``plan``, ``missing_features``) plus a small command line used by
``scripts/install-llama.sh`` *before* the package is installed, so this module imports the standard
library only and runs as a script: ``python3 agent/hardware/build_profile.py plan``.

Profiles (``EDGE_AGENT_LLAMA_PROFILE``; docs/operations.md, "llama.cpp build profiles"):

``safe`` (the default)
    Native code for the build CPU (``GGML_NATIVE``), with the extensions known to fault turned off:
    on x86_64 the AMX tile instructions (ggml's AMX kernels die with SIGILL on ``tilezero`` on
    Sapphire Rapids class CPUs, whatever permission the process asks for), on aarch64 SME
    (streaming mode; ggml's own run-check keeps SVE, dotprod and i8mm only where they execute).
``native``
    Everything the build CPU reports, AMX and SME included: for operators who have run
    ``edge-agent doctor`` on that CPU kind and opt in.
``portable``
    No native detection: x86_64 AVX2/FMA/F16C (any x86 CPU since 2015), aarch64 ARMv8-A with NEON.
    One wheel for a mixed fleet, slower than native.

Invariants:
- ``plan`` is total: an unknown machine gets the ``native`` flags with every reported feature
  assumed (nothing can be said about what is safe there).
- a plan's ``assumed`` set is what a CPU must have to run the build; ``missing_features`` is empty
  exactly when this CPU has all of it, and a cached or installed build is reused only then.
- ``build_id`` changes whenever anything that changes the machine code changes (version, profile,
  flags, assumed features), so results remembered per build (the crash-isolation verdicts) are
  never carried over to another build.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROFILES = ("safe", "native", "portable")
DEFAULT_PROFILE = "safe"
PROFILE_ENV = "EDGE_AGENT_LLAMA_PROFILE"
RECORD_NAME = "llama-build.json"
"""The build record, next to a cached wheel and in ``<venv>/share/edge-agent/`` once installed."""

_X86_ISA = re.compile(
    r"^(sse\d.*|ssse3|avx.*|amx.*|fma|f16c|bmi\d|popcnt|abm|lzcnt|movbe|adx|aes|pclmulqdq|"
    r"vpclmulqdq|vaes|gfni|sha_ni|xsave|xsavec|xsaveopt|xsaves)$"
)
X86_AMX = ("amx_tile", "amx_int8", "amx_bf16")
X86_AMX_CFLAGS = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")
"""Explicit ISA flags win over ``-march=native`` whatever their order on GCC and clang."""
X86_PORTABLE = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2")
ARM_PORTABLE = ("asimd",)


@dataclass(frozen=True)
class BuildPlan:
    """How to build llama-cpp-python for one profile on one CPU, and what the result assumes."""

    profile: str
    machine: str
    cmake_args: tuple[str, ...]
    cflags: tuple[str, ...]
    assumed: tuple[str, ...]
    """Sorted CPU features the built code may execute."""
    disabled: tuple[str, ...] = ()
    """CPU features present here that the profile keeps out of the build."""

    def record(self, version: str) -> dict[str, object]:
        """The build record (JSON) for llama-cpp-python ``version`` built from this plan."""
        data: dict[str, object] = {"llama_cpp_version": version, **asdict(self)}
        data["build_id"] = build_id(data)
        return data

    def cache_key(self, version: str) -> str:
        """Directory name in the wheel cache: version, machine, profile and a digest of the rest."""
        return f"{version}-{self.machine}-{self.profile}-{build_id(self.record(version))[:12]}"


@dataclass(frozen=True)
class Cpu:
    machine: str
    features: frozenset[str] = field(default_factory=frozenset)


def isa_features(cpuinfo: str, machine: str) -> frozenset[str]:
    """The instruction-set features in ``/proc/cpuinfo`` text (x86 ``flags``, arm ``Features``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "flags" and machine in ("x86_64", "amd64", "i686"):
            return frozenset(f for f in value.split() if _X86_ISA.match(f))
        if key == "features" and machine in ("aarch64", "arm64", "armv7l"):
            return frozenset(value.split())
    return frozenset()


def plan(profile: str, cpu: Cpu) -> BuildPlan:
    """The build for ``profile`` on ``cpu`` (module docstring). Raises ValueError for an unknown profile."""
    if profile not in PROFILES:
        raise ValueError(
            f"unknown llama.cpp build profile {profile!r}: expected one of {', '.join(PROFILES)}"
        )
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(cpu.machine, cpu.machine)
    feats = cpu.features
    if machine == "x86_64":
        if profile == "portable":
            flags = [f"-DGGML_{f}=ON" for f in ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2")]
            off = ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AVX_VNNI", "AMX_TILE", "AMX_INT8")
            flags += [f"-DGGML_{f}=OFF" for f in off]
            return BuildPlan(
                profile,
                machine,
                ("-DGGML_NATIVE=OFF", *flags),
                (),
                tuple(sorted(X86_PORTABLE)),
                tuple(sorted(feats - set(X86_PORTABLE))),
            )
        if profile == "safe":
            amx = frozenset(f for f in feats if f.startswith("amx"))
            return BuildPlan(
                profile,
                machine,
                ("-DGGML_NATIVE=ON",),
                X86_AMX_CFLAGS,
                tuple(sorted(feats - amx)),
                tuple(sorted(amx)),
            )
    if machine == "aarch64":
        if profile == "portable":
            return BuildPlan(
                profile,
                machine,
                ("-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8-a"),
                (),
                tuple(sorted(ARM_PORTABLE)),
                tuple(sorted(feats - set(ARM_PORTABLE))),
            )
        if profile == "safe":
            # ggml's native ARM detection run-checks each feature; a pre-set cache result skips the
            # SME check and makes it append +nosme.
            sme = frozenset(f for f in feats if f.startswith("sme"))
            return BuildPlan(
                profile,
                machine,
                ("-DGGML_NATIVE=ON", "-DGGML_MACHINE_SUPPORTS_sme=OFF"),
                (),
                tuple(sorted(feats - sme)),
                tuple(sorted(sme)),
            )
    return BuildPlan(profile, machine, ("-DGGML_NATIVE=ON",), (), tuple(sorted(feats)))


def missing_features(record: dict[str, object], cpu: Cpu) -> list[str]:
    """What a build (its record) assumes that ``cpu`` lacks; a machine mismatch counts as missing."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(cpu.machine, cpu.machine)
    if record.get("machine") != machine:
        return [f"machine {record.get('machine')} (this is {machine})"]
    assumed = record.get("assumed")
    if not isinstance(assumed, list | tuple):
        return ["a build record without its assumed features"]
    return sorted(str(f) for f in assumed if f not in cpu.features)


def build_id(record: dict[str, object]) -> str:
    """A digest of everything in a record that changes the machine code (module docstring)."""
    keys = ("llama_cpp_version", "profile", "machine", "cmake_args", "cflags", "assumed")
    canonical = json.dumps({k: record.get(k) for k in keys}, sort_keys=True, default=list)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def this_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> Cpu:
    """The CPU this process runs on (I/O edge)."""
    machine = platform.machine()
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    return Cpu(machine, isa_features(text, machine))


def installed_record(prefix: str | None = None) -> dict[str, object] | None:
    """The record of the llama-cpp-python installed in this environment, if the install script wrote one."""
    path = Path(prefix or sys.prefix) / "share" / "edge-agent" / RECORD_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def installed_build(record: dict[str, object] | None = None) -> tuple[str, dict[str, object] | None]:
    """(build id, build record) of the installed llama-cpp-python: the record's id when the install
    script wrote one (or ``record`` is given), else ``llama-cpp-python-<version>``."""
    from importlib import metadata

    record = installed_record() if record is None else record
    if record is not None and isinstance(record.get("build_id"), str) and record["build_id"]:
        return str(record["build_id"]), record
    try:
        version = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        version = "none"
    return f"llama-cpp-python-{version}", None


def _main(argv: list[str]) -> int:
    """``plan [VERSION]``: the plan as JSON (profile from the environment), with its cache key.
    ``check RECORD``: exit 0 when this CPU runs the recorded build, else name what it lacks."""
    cpu = this_cpu()
    if argv[:1] == ["plan"]:
        version = argv[1] if len(argv) > 1 else "unknown"
        profile = os.environ.get(PROFILE_ENV, "").strip() or DEFAULT_PROFILE
        try:
            chosen = plan(profile, cpu)
        except ValueError as exc:
            print(f"{PROFILE_ENV}: {exc}", file=sys.stderr)
            return 2
        out = chosen.record(version)
        out["cache_key"] = chosen.cache_key(version)
        out["cmake"] = " ".join(chosen.cmake_args)
        out["cflags_str"] = " ".join(chosen.cflags)
        print(json.dumps(out, indent=2, default=list))
        return 0
    if argv[:1] == ["check"] and len(argv) == 2:
        try:
            record = json.loads(Path(argv[1]).read_text())
        except (OSError, ValueError) as exc:
            print(f"unreadable build record {argv[1]}: {exc}", file=sys.stderr)
            return 1
        missing = missing_features(record, cpu)
        if missing:
            print(f"this CPU lacks what the build assumes: {', '.join(missing)}", file=sys.stderr)
            return 1
        return 0
    print("usage: build_profile.py plan [VERSION] | check RECORD", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

__all__ = [
    "BuildPlan",
    "Cpu",
    "DEFAULT_PROFILE",
    "PROFILES",
    "PROFILE_ENV",
    "RECORD_NAME",
    "build_id",
    "installed_build",
    "installed_record",
    "isa_features",
    "missing_features",
    "plan",
    "this_cpu",
]
