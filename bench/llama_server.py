"""llama.cpp's own C++ ``llama-server``, built like our llama-cpp-python, as the benchmarks' peer.

The peer must run the same llama.cpp code with the same machine code as the engine, so that a
difference in the figures is a difference of the serving layer, not of the kernels. Therefore:

- **Source**: the llama-cpp-python sdist of the version installed in this environment
  (``llama_cpp.__version__``), fetched from PyPI with
  ``pip download --no-deps --no-binary :all: llama-cpp-python==VERSION`` (the same file
  ``scripts/install-llama.sh`` builds the wheel from); its ``vendor/llama.cpp`` is the source. Nothing
  else is fetched: the web UI is neither built (npm) nor downloaded (``LLAMA_USE_PREBUILT_UI=OFF``),
  curl and OpenSSL are off.
- **Flags**: the build profile named in the environment's build record
  (``<venv>/share/edge-agent/llama-build.json``, written by ``scripts/install-llama.sh``), planned
  for this CPU by ``agent/hardware/build_profile.py``: the same ``cmake_args`` and ``CFLAGS`` /
  ``CXXFLAGS``, Release. The plan's ``build_id`` must equal the record's (same version, profile,
  flags and assumed CPU features), else the build is refused: a peer built differently would not
  be a peer. Without a record (a venv not installed by the script) the default profile is used and
  the record says so. The libraries are linked statically (``BUILD_SHARED_LIBS=OFF``) so the cached
  binary stands alone; the compiled kernels are the same.
- **Target**: only ``llama-server``, ``cmake --build -j2 --target llama-server`` (27 minutes on two
  cores busy with other work, the first time here).
- **Cache**: ``~/.cache/edge-agent/llama-server/<version>-<machine>-<profile>-<build id[:12]>/``
  holds ``llama-server`` and ``llama-server.json`` (the build record plus the sdist's and the
  binary's sha256). It is reused when that record's ``build_id`` equals the plan's, this CPU has
  every feature the build assumes, and the binary's digest matches; otherwise it is rebuilt (into a
  temporary directory renamed into place, so a half-built cache is never used). ``--rebuild``
  forces a build; ``EDGE_AGENT_LLAMA_SERVER_CACHE`` moves the cache. A lock file next to the
  directory makes a second bench started during a build wait for it instead of building again.

Bench only: the test suite never needs this. Command line::

    .venv/bin/python bench/llama_server.py          # build or reuse, print the binary's path
    .venv/bin/python bench/llama_server.py --rebuild
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.hardware import build_profile  # noqa: E402

RECORD = "llama-server.json"
BINARY = "llama-server"
EXTRA_CMAKE = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
)
"""What the server build adds to the profile's flags: only which targets exist and how they link."""


def cache_root() -> Path:
    env = os.environ.get("EDGE_AGENT_LLAMA_SERVER_CACHE", "").strip()
    return Path(env) if env else Path.home() / ".cache" / "edge-agent" / "llama-server"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def installed_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


def wanted(version: str | None = None) -> tuple[dict[str, object], build_profile.BuildPlan]:
    """(record of the server build to use, its plan): the venv's profile, planned for this CPU.

    Raises RuntimeError when the plan differs from the venv's record (another build id)."""
    version = version or installed_version()
    venv = build_profile.installed_record()
    profile = str(venv.get("profile")) if venv else build_profile.DEFAULT_PROFILE
    chosen = build_profile.plan(profile, build_profile.this_cpu())
    record = chosen.record(version)
    if venv is not None and venv.get("build_id") != record["build_id"]:
        raise RuntimeError(
            f"the installed llama-cpp-python's build ({venv.get('build_id')}, profile {profile}, "
            f"version {venv.get('llama_cpp_version')}) is not what profile {profile} plans for "
            f"llama-cpp-python {version} on this CPU ({record['build_id']}); "
            "reinstall with scripts/install-llama.sh first"
        )
    record["venv_record"] = "matched" if venv is not None else "absent (default profile)"
    record["extra_cmake"] = list(EXTRA_CMAKE)
    return record, chosen


def cached(directory: Path, record: dict[str, object]) -> Path | None:
    """The cached binary in ``directory`` when its record matches ``record`` and this CPU runs it."""
    try:
        have = json.loads((directory / RECORD).read_text())
    except (OSError, ValueError):
        return None
    binary = directory / BINARY
    if not isinstance(have, dict) or have.get("build_id") != record["build_id"]:
        return None
    if have.get("extra_cmake") != record["extra_cmake"] or not binary.is_file():
        return None
    if build_profile.missing_features(have, build_profile.this_cpu()):
        return None
    if have.get("binary_sha256") != sha256(binary):
        return None
    return binary


def build(record: dict[str, object], chosen: build_profile.BuildPlan, out: Path, jobs: int = 2) -> Path:
    """Fetch the sdist, build ``llama-server`` into a temporary directory, move it to ``out``."""
    version = str(record["llama_cpp_version"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".building-", dir=out.parent) as tmp_:
        tmp = Path(tmp_)
        log(f"fetching llama-cpp-python {version} sdist from PyPI")
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, f"llama-cpp-python=={version}", "-d", str(tmp)], check=True)
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp / "src", filter="data")
        source = next((tmp / "src").glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        flags = " ".join(chosen.cflags)
        env = os.environ | {
            "CFLAGS": f"{os.environ.get('CFLAGS', '')} {flags}".strip(),
            "CXXFLAGS": f"{os.environ.get('CXXFLAGS', '')} {flags}".strip(),
        }
        cmake = ["cmake", "-S", str(source), "-B", str(tmp / "build"), *chosen.cmake_args, *EXTRA_CMAKE]
        if shutil.which("ninja"):
            cmake += ["-G", "Ninja"]
        log(f"configuring: {' '.join(chosen.cmake_args)} CFLAGS={flags!r}")
        subprocess.run(cmake, check=True, env=env, stdout=subprocess.DEVNULL)
        log(f"building llama-server with -j{jobs} (minutes: 27 on two busy cores)")
        target = ["cmake", "--build", str(tmp / "build"), "-j", str(jobs), "--target", BINARY]
        subprocess.run(target, check=True, env=env, stdout=subprocess.DEVNULL)
        binary = next((tmp / "build").rglob(BINARY))
        stage = tmp / "out"
        stage.mkdir()
        shutil.copy2(binary, stage / BINARY)
        done = dict(record) | {"sdist": sdist.name, "sdist_sha256": sha256(sdist)}
        done["binary_sha256"] = sha256(stage / BINARY)
        (stage / RECORD).write_text(json.dumps(done, indent=2, default=list) + "\n")
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
    return out / BINARY


def ensure(rebuild: bool = False, jobs: int = 2) -> tuple[Path, dict[str, object]]:
    """(path of a ``llama-server`` built like the installed llama-cpp-python, its record)."""
    record, chosen = wanted()
    out = cache_root() / chosen.cache_key(str(record["llama_cpp_version"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second bench started meanwhile waits, then reuses
        binary = None if rebuild else cached(out, record)
        if binary is None:
            binary = build(record, chosen, out, jobs)
        else:
            log(f"reusing {binary}")
        return binary, json.loads((out / RECORD).read_text())


def log(message: str) -> None:
    print(f"llama-server: {message}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rebuild", action="store_true", help="build even when the cache matches")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    args = ap.parse_args()
    binary, _ = ensure(args.rebuild, args.jobs)
    print(binary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
