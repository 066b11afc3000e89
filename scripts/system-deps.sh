#!/usr/bin/env bash
# Debian packages the build and the tests need: a C/C++ toolchain and cmake (llama-cpp-python is
# built from source when no cached wheel is there), the venv module, Mosquitto (the sync tests start
# their own brokers) with its plugin headers (mosquitto-dev, libmosquitto-dev: the broker plugin
# mosquitto/edge_acl.c is compiled by the tests and by operators), nginx (the tests' HTTP mirror
# of model bytes, tests/sync/mirror_server.py), PostgreSQL (the hub store tests start a private
# cluster with initdb/pg_ctl; a system cluster is not wanted), openssl (test certificates) and
# systemd (`systemd-analyze verify` of the units). Installs the missing ones when run as root on a
# system with apt-get; otherwise names them
# and exits 1. Does nothing when all are there, or on a system without dpkg.
set -euo pipefail
if ! command -v dpkg-query >/dev/null 2>&1; then
  echo "system-deps: not a Debian system; make sure a C/C++ compiler, cmake, python3 venv, mosquitto, nginx and openssl are installed"
  exit 0
fi
need=()
for pkg in build-essential cmake mosquitto mosquitto-clients mosquitto-dev libmosquitto-dev nginx postgresql openssl systemd; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
python3 -c "import ensurepip, venv" 2>/dev/null || need+=(python3-venv)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
  # The tests start their own brokers; a system broker is not wanted.
  if [[ " ${need[*]} " == *" mosquitto "* ]]; then
    systemctl disable --now mosquitto >/dev/null 2>&1 || true
  fi
  # Likewise nginx and PostgreSQL: the tests run their own on loopback ports.
  if [[ " ${need[*]} " == *" nginx "* ]]; then
    systemctl disable --now nginx >/dev/null 2>&1 || true
  fi
  if [[ " ${need[*]} " == *" postgresql "* ]]; then
    systemctl disable --now postgresql >/dev/null 2>&1 || true
  fi
else
  echo "system-deps: missing Debian packages: ${need[*]}" >&2
  echo "system-deps: install them with: sudo apt-get install ${need[*]}" >&2
  exit 1
fi
