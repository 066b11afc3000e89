#!/usr/bin/env bash
# Make the fleet's CAs, a broker certificate and client certificates for the given CNs: the same
# as `edge-hub certs` (docs/operations.md, "The broker"), for a checkout with its .venv.
#   mosquitto/mkcerts.sh DIR hub operator dev-001 dev-002 --broker-host broker.example.net
# DIR is relative to the current directory. The CN of a client certificate is its MQTT identity
# (the ACL's %u); hub and operator are signed by the service CA, device ids by the device CA.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m hub.sync.certs "$@"
