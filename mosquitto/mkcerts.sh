#!/usr/bin/env bash
# Make a test CA, a broker certificate and client certificates for the given CNs.
#   mosquitto/mkcerts.sh DIR hub operator dev-001 dev-002
# The CN of a client certificate is its MQTT identity (the ACL's %u).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
cd "$here" && exec "$py" -m hub.sync.certs "$@"
