"""llama.cpp build profiles (agent/hardware/build_profile.py): what each builds and assumes, when a
cached or installed build may run, and that the build installed here contains what its profile says."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.hardware.build_profile import (
    Cpu,
    installed_record,
    isa_features,
    missing_features,
    plan,
    this_cpu,
)

SAPPHIRE = Cpu(
    "x86_64",
    frozenset(
        {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8"}
    ),
)
ZEN4 = Cpu("x86_64", frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni"}))
HASWELL = Cpu("x86_64", frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}))
OLD_X86 = Cpu("x86_64", frozenset({"sse4_2", "avx"}))
GRACE = Cpu("aarch64", frozenset({"asimd", "asimddp", "i8mm", "sve", "sve2", "sme"}))
PI4 = Cpu("aarch64", frozenset({"fp", "asimd"}))


@pytest.mark.parametrize(
    ("profile", "cpu", "flags", "cflags", "assumed_has", "assumed_lacks", "disabled"),
    [
        pytest.param(
            "safe",
            SAPPHIRE,
            ["-DGGML_NATIVE=ON"],
            ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"],
            {"avx512f", "avx512_vnni"},
            {"amx_tile", "amx_int8"},
            ("amx_int8", "amx_tile"),
            id="safe-intel-amx",
        ),
        pytest.param(
            "safe",
            ZEN4,
            ["-DGGML_NATIVE=ON"],
            ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"],
            {"avx512f"},
            set(),
            (),
            id="safe-amd",
        ),
        pytest.param(
            "native", SAPPHIRE, ["-DGGML_NATIVE=ON"], [], {"amx_tile"}, set(), (), id="native-opt-in"
        ),
        pytest.param(
            "portable",
            SAPPHIRE,
            ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_AVX512=OFF", "-DGGML_AMX_INT8=OFF"],
            [],
            {"avx2", "fma"},
            {"avx512f", "amx_tile"},
            None,
            id="portable-x86",
        ),
        pytest.param(
            "safe",
            GRACE,
            ["-DGGML_NATIVE=ON", "-DGGML_MACHINE_SUPPORTS_sme=OFF"],
            [],
            {"sve", "i8mm"},
            {"sme"},
            ("sme",),
            id="safe-arm-sme-off",
        ),
        pytest.param(
            "portable",
            GRACE,
            ["-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8-a"],
            [],
            {"asimd"},
            {"sve"},
            None,
            id="portable-arm",
        ),
        pytest.param(
            "safe", Cpu("riscv64", frozenset()), ["-DGGML_NATIVE=ON"], [], set(), set(), (), id="other-arch"
        ),
    ],
)
def test_what_each_profile_builds_and_assumes(
    profile: str,
    cpu: Cpu,
    flags: list[str],
    cflags: list[str],
    assumed_has: set[str],
    assumed_lacks: set[str],
    disabled: tuple[str, ...] | None,
) -> None:
    chosen = plan(profile, cpu)
    assert set(flags) <= set(chosen.cmake_args)
    assert list(chosen.cflags) == cflags
    assert assumed_has <= set(chosen.assumed)
    assert not (assumed_lacks & set(chosen.assumed))
    if disabled is not None:
        assert chosen.disabled == disabled


def test_an_unknown_profile_is_named() -> None:
    with pytest.raises(ValueError, match="'fast'"):
        plan("fast", HASWELL)


@pytest.mark.parametrize(
    ("built_on", "profile", "runs_on", "missing"),
    [
        pytest.param(SAPPHIRE, "safe", SAPPHIRE, [], id="same-cpu"),
        pytest.param(SAPPHIRE, "safe", ZEN4, [], id="safe-intel-build-on-zen4"),
        pytest.param(SAPPHIRE, "native", ZEN4, ["amx_int8", "amx_tile"], id="native-amx-build-on-amd"),
        pytest.param(ZEN4, "safe", HASWELL, ["avx512_vnni", "avx512f"], id="avx512-build-on-haswell"),
        pytest.param(SAPPHIRE, "portable", HASWELL, [], id="portable-anywhere-with-avx2"),
        pytest.param(HASWELL, "portable", OLD_X86, ["avx2", "bmi2", "f16c", "fma"], id="portable-needs-avx2"),
        pytest.param(GRACE, "safe", PI4, ["asimddp", "i8mm", "sve", "sve2"], id="arm-server-build-on-pi"),
        pytest.param(GRACE, "safe", SAPPHIRE, ["machine aarch64 (this is x86_64)"], id="other-machine"),
    ],
)
def test_a_build_runs_only_where_its_assumed_features_are(
    built_on: Cpu, profile: str, runs_on: Cpu, missing: list[str]
) -> None:
    record = json.loads(json.dumps(plan(profile, built_on).record("0.3.36")))  # as written to disk
    assert missing_features(record, runs_on) == missing


def test_the_build_id_and_cache_key_change_with_what_changes_the_code() -> None:
    base = plan("safe", SAPPHIRE)
    ids = {
        base.record("0.3.36")["build_id"],
        base.record("0.3.37")["build_id"],
        plan("native", SAPPHIRE).record("0.3.36")["build_id"],
        plan("safe", HASWELL).record("0.3.36")["build_id"],
    }
    assert len(ids) == 4
    assert base.record("0.3.36")["build_id"] == plan("safe", SAPPHIRE).record("0.3.36")["build_id"]
    assert base.cache_key("0.3.36").startswith("0.3.36-x86_64-safe-")


@pytest.mark.parametrize(
    ("text", "machine", "expected"),
    [
        pytest.param(
            "processor : 0\nflags : fpu sse4_2 avx2 hypervisor amx_tile constant_tsc fma\n",
            "x86_64",
            {"sse4_2", "avx2", "amx_tile", "fma"},
            id="x86-flags",
        ),
        pytest.param(
            "processor : 0\nFeatures : fp asimd asimddp sve\n",
            "aarch64",
            {"fp", "asimd", "asimddp", "sve"},
            id="arm-features",
        ),
        pytest.param("", "x86_64", set(), id="unreadable"),
    ],
)
def test_isa_features(text: str, machine: str, expected: set[str]) -> None:
    assert isa_features(text, machine) == expected


def test_the_script_form_plans_and_checks(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[2] / "agent" / "hardware" / "build_profile.py"
    out = subprocess.run(
        [sys.executable, "-P", str(script), "plan", "0.3.36"], capture_output=True, text=True, check=True
    )
    record = json.loads(out.stdout)
    assert record["profile"] == "safe" and record["cache_key"].startswith("0.3.36-")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    assert subprocess.run([sys.executable, "-P", str(script), "check", str(path)]).returncode == 0
    record["assumed"] = [*record["assumed"], "an_instruction_nobody_has"]
    path.write_text(json.dumps(record))
    checked = subprocess.run(
        [sys.executable, "-P", str(script), "check", str(path)], capture_output=True, text=True
    )
    assert checked.returncode == 1 and "an_instruction_nobody_has" in checked.stderr
    bad = subprocess.run(
        [sys.executable, "-P", str(script), "plan"],
        capture_output=True,
        text=True,
        env={"EDGE_AGENT_LLAMA_PROFILE": "fast"},
    )
    assert bad.returncode == 2 and "'fast'" in bad.stderr


AMX_INSTRUCTION = re.compile(
    r"\s(tilezero|tileloadd|tileloaddt1|tilestored|tdpb[su][su]d|tdpbf16ps|ldtilecfg|tilerelease)\s"
)


def test_the_installed_build_runs_here_and_contains_only_what_it_assumes() -> None:
    """The llama.cpp installed by scripts/install-llama.sh: this CPU has every feature its record
    assumes, and where the profile leaves AMX out, its CPU library holds no AMX instruction."""
    record = installed_record()
    if record is None:
        pytest.skip("llama-cpp-python was not installed by scripts/install-llama.sh (no build record)")
    assert missing_features(record, this_cpu()) == []
    assumed = record["assumed"]
    assert isinstance(assumed, list)
    if record["machine"] != "x86_64" or any(str(f).startswith("amx") for f in assumed):
        return
    objdump = shutil.which("objdump")
    assert objdump is not None, "binutils (objdump) is part of build-essential"
    import llama_cpp

    libs = sorted(Path(llama_cpp.__file__).parent.rglob("libggml-cpu.so*"))
    assert libs, "no libggml-cpu in the llama_cpp package"
    text = subprocess.run(
        [objdump, "-d", "--no-show-raw-insn", str(libs[0])], capture_output=True, text=True, check=True
    ).stdout
    assert len(text) > 100_000  # really disassembled
    assert AMX_INSTRUCTION.search(text) is None
