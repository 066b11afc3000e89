#!/usr/bin/env bash
# Install llama-cpp-python into the venv, built for this CPU with a build profile
# (agent/hardware/build_profile.py; docs/operations.md "llama.cpp build profiles"):
#   EDGE_AGENT_LLAMA_PROFILE=safe      native code, the extensions known to fault (AMX, SME) left out (default)
#   EDGE_AGENT_LLAMA_PROFILE=native    everything this CPU reports (opt-in, after `edge-agent doctor`)
#   EDGE_AGENT_LLAMA_PROFILE=portable  AVX2 (x86_64) or ARMv8-A (aarch64) baseline, one wheel for a mixed fleet
# Building takes 3-6 minutes on two cores, so the wheel is kept in a per-machine cache with its build
# record (profile, flags, the CPU features it assumes) and reused only on a CPU that has all of
# those features; the script never depends on the cache (a cold cache just builds). The record is
# copied into the venv (share/edge-agent/llama-build.json), where `edge-agent doctor` reads it.
set -euo pipefail
PY=${1:?usage: install-llama.sh VENV_PYTHON}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
CACHE=${EDGE_AGENT_WHEEL_CACHE:-$HOME/.cache/edge-agent/wheels}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PROFILE_PY="$HERE/agent/hardware/build_profile.py"
PREFIX=$("$PY" -c 'import sys; print(sys.prefix)')
RECORD="$PREFIX/share/edge-agent/llama-build.json"
mkdir -p "$CACHE" "$(dirname "$RECORD")"

plan=$(mktemp); trap 'rm -f "$plan"' EXIT
"$PY" -P "$PROFILE_PY" plan "$VERSION" >"$plan"
jget() { "$PY" -c "import json,sys; v=json.load(open(sys.argv[1])).get(sys.argv[2]); print(' '.join(v) if isinstance(v, list) else v)" "$1" "$2"; }
field() { jget "$plan" "$1"; }
profile=$(field profile); key=$(field cache_key); build_id=$(field build_id)
echo "llama.cpp build profile: $profile ($(field cmake) $(field cflags_str)); leaves out: $(field disabled)"

# Already installed with the same build? (same version, same build id, and this CPU runs it)
if "$PY" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.__version__ == '$VERSION' else 1)" 2>/dev/null \
   && [ -f "$RECORD" ] && "$PY" -P "$PROFILE_PY" check "$RECORD" \
   && [ "$(jget "$RECORD" build_id)" = "$build_id" ]; then
  echo "llama-cpp-python $VERSION ($profile build $build_id) already installed"
  exit 0
fi

# A cached wheel of this profile whose assumed features this CPU has (never one it lacks).
wheel=""
for dir in "$CACHE"/"$VERSION"-*-"$profile"-*/; do
  [ -f "$dir/llama-build.json" ] || continue
  if "$PY" -P "$PROFILE_PY" check "$dir/llama-build.json" 2>/dev/null \
     && [ "$(jget "$dir/llama-build.json" build_id)" = "$build_id" ]; then
    candidate=$(ls "$dir"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    [ -n "$candidate" ] && { wheel=$candidate; cp "$dir/llama-build.json" "$RECORD.new"; break; }
  fi
done

if [ -n "$wheel" ] && "$PY" -m pip install -q --no-deps --force-reinstall "$wheel"; then
  echo "llama-cpp-python $VERSION installed from cached wheel $wheel"
else
  echo "building llama-cpp-python $VERSION from source, profile $profile (3-6 minutes on 2 cores)"
  out="$CACHE/$key"; tmp="$CACHE/.building-$$"
  rm -rf "$tmp"; mkdir -p "$tmp"
  cflags=$(field cflags_str)
  CMAKE_ARGS="$(field cmake)" CFLAGS="${CFLAGS:-} $cflags" CXXFLAGS="${CXXFLAGS:-} $cflags" \
    "$PY" -m pip wheel -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$VERSION" -w "$tmp"
  "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); [d.pop(k) for k in ('cache_key','cmake','cflags_str')]; json.dump(d, open(sys.argv[2],'w'), indent=2)" "$plan" "$tmp/llama-build.json"
  rm -rf "$out"; mv "$tmp" "$out"
  wheel=$(ls "$out"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
  cp "$out/llama-build.json" "$RECORD.new"
  "$PY" -m pip install -q --no-deps --force-reinstall "$wheel"
fi
mv "$RECORD.new" "$RECORD"

# Prove the profile by what the build contains: no AMX instruction where the profile leaves AMX out.
lib=$("$PY" -c "import llama_cpp, pathlib; print(next(pathlib.Path(llama_cpp.__file__).parent.rglob('libggml-cpu.so*')))" 2>/dev/null || true)
if [ -n "$lib" ] && command -v objdump >/dev/null 2>&1 && [ "$(field machine)" = x86_64 ] \
   && [[ " $(jget "$RECORD" assumed) " != *" amx_"* ]]; then
  n=$(objdump -d --no-show-raw-insn "$lib" | grep -cE '\s(tilezero|tileloadd|tileloaddt1|tilestored|tdpb[su][su]d|tdpbf16ps|ldtilecfg|tilerelease)\s' || true)
  if [ "$n" != "0" ]; then
    echo "install-llama: the $profile build of $lib contains $n AMX instructions; refusing it" >&2
    rm -f "$RECORD"
    exit 1
  fi
  echo "llama.cpp build checked: no AMX instruction in $(basename "$lib")"
fi
# Its runtime dependencies (numpy, jinja2, diskcache, typing-extensions) come from PyPI.
"$PY" -m pip install -q "numpy>=1.20" "jinja2>=2.11.3" "diskcache>=5.6.1" "typing-extensions>=4.5"
