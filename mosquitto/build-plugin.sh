#!/usr/bin/env bash
# Build the broker plugin mosquitto/edge_acl.c (device ACL rules the acl_file cannot express).
#   mosquitto/build-plugin.sh [OUT]     (default: mosquitto/edge_acl.so)
# Needs a C compiler and Mosquitto's plugin headers (Debian: mosquitto-dev libmosquitto-dev).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/edge_acl.so}"
tmp="$(mktemp "${out}.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
${CC:-cc} -shared -fPIC -O2 -Wall -Wextra -Werror -o "$tmp" "$here/edge_acl.c"
chmod 0755 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
echo "$out"
