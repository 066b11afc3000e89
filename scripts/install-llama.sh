#!/usr/bin/env bash
# Install llama-cpp-python into the venv. Building it from source takes about 6 minutes on two
# cores, so the built wheel is kept in a per-machine cache and reused when it is there; the
# script never depends on the cache (a cold cache just builds).
set -euo pipefail
PY=${1:?usage: install-llama.sh VENV_PYTHON}
VERSION=${LLAMA_CPP_VERSION:-0.3.36}
CACHE=${EDGE_AGENT_WHEEL_CACHE:-$HOME/.cache/edge-agent/wheels}
mkdir -p "$CACHE"
if "$PY" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.__version__ == '$VERSION' else 1)" 2>/dev/null; then
  echo "llama-cpp-python $VERSION already installed"
  exit 0
fi
wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1 || true)
if [ -n "$wheel" ] && "$PY" -m pip install -q --no-deps "$wheel"; then
  echo "llama-cpp-python $VERSION installed from cached wheel $wheel"
else
  echo "building llama-cpp-python $VERSION from source (about 6 minutes on 2 cores)"
  "$PY" -m pip wheel -q --no-deps "llama-cpp-python==$VERSION" -w "$CACHE"
  wheel=$(ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl | head -n 1)
  "$PY" -m pip install -q --no-deps "$wheel"
fi
# Its runtime dependencies (numpy, jinja2, diskcache, typing-extensions) come from PyPI.
"$PY" -m pip install -q "numpy>=1.20" "jinja2>=2.11.3" "diskcache>=5.6.1" "typing-extensions>=4.5"
