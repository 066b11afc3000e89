#!/usr/bin/env bash
# Install edge-agent as a systemd service (run as root from a checkout): `make install-service`.
#
#   systemd/install.sh [--hub] [--no-start]
#
# Environment:
#   PREFIX   where the virtualenv goes           (default /opt/edge-agent)
#   BINDIR   where the command links go          (default /usr/local/bin)
#   DESTDIR  stage everything under this root instead of / (packaging, tests): no user is
#            created, nothing is enabled or started, and the venv is not built (WITH_VENV=0)
#   WITH_VENV=0  skip building the virtualenv (it is already there)
#
# Idempotent: existing users, config files and enabled units are left as they are; a changed
# unit file is replaced and systemd reloaded. See docs/operations.md.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/opt/edge-agent}
BINDIR=${BINDIR:-/usr/local/bin}
DESTDIR=${DESTDIR:-}
WITH_VENV=${WITH_VENV:-$([ -n "$DESTDIR" ] && echo 0 || echo 1)}
HUB=0
START=1
for arg in "$@"; do
  case "$arg" in
    --hub) HUB=1 ;;
    --no-start) START=0 ;;
    *) echo "usage: $0 [--hub] [--no-start]" >&2; exit 2 ;;
  esac
done

UNITDIR="$DESTDIR/etc/systemd/system"
DOCDIR="$DESTDIR/usr/local/share/doc/edge-agent"

say() { echo "install-service: $*"; }

ensure_user() {  # name home
  if [ -n "$DESTDIR" ]; then return; fi
  if ! getent group "$1" >/dev/null; then groupadd --system "$1"; say "group $1 created"; fi
  if ! getent passwd "$1" >/dev/null; then
    useradd --system --gid "$1" --home-dir "$2" --no-create-home --shell /usr/sbin/nologin \
      --comment "edge-agent service" "$1"
    say "user $1 created"
  fi
}

owner() {  # the owner spec for install(1): root:group, or nothing when staging
  if [ -n "$DESTDIR" ]; then echo ""; else echo "-o root -g $1"; fi
}

ensure_group() {  # name: a group without a user (API callers join it)
  if [ -n "$DESTDIR" ]; then return; fi
  if ! getent group "$1" >/dev/null; then groupadd --system "$1"; say "group $1 created"; fi
}

ensure_user edge-agent /var/lib/edge-agent
# Local applications that use the API join edge-agent-clients (the socket's group), never
# edge-agent: that group's files (the MQTT key directory) are the service's.
ensure_group edge-agent-clients
[ "$HUB" = 1 ] && ensure_user edge-hub /var/lib/edge-hub

if [ "$WITH_VENV" = 1 ]; then
  say "virtualenv in $PREFIX"
  python3 -m venv "$PREFIX"
  "$PREFIX/bin/python" -m pip install -q --upgrade pip wheel setuptools
  bash scripts/install-llama.sh "$PREFIX/bin/python"
  "$PREFIX/bin/python" -m pip install -q .
fi
install -d "$DESTDIR$BINDIR"
ln -sfn "$PREFIX/bin/edge-agent" "$DESTDIR$BINDIR/edge-agent"
[ "$HUB" = 1 ] && ln -sfn "$PREFIX/bin/edge-hub" "$DESTDIR$BINDIR/edge-hub"

install -d -m 0755 "$UNITDIR"
units=(edge-agent.service edge-agent.socket)
[ "$HUB" = 1 ] && units+=(edge-hub.service edge-hub-crl.service edge-hub-crl.timer)
for unit in "${units[@]}"; do
  # ExecStart names $BINDIR (the units ship with /usr/local/bin).
  sed "s#/usr/local/bin/#$BINDIR/#" "systemd/$unit" > "$UNITDIR/.$unit.tmp"
  chmod 0644 "$UNITDIR/.$unit.tmp"
  mv "$UNITDIR/.$unit.tmp" "$UNITDIR/$unit"
done
say "units in $UNITDIR: ${units[*]}"

# The configuration: the example with the service's paths. It holds no secret (keys live in their
# own files), so it is world-readable: `edge-agent status` run by an API caller reads it to find the
# socket. An existing file is never overwritten.
install -d -m 0755 "$DESTDIR/etc/edge-agent"
# The broker identity: only the service user may read the key (docs/operations.md, section 4).
# shellcheck disable=SC2046
install -d -m 0750 $(owner edge-agent) "$DESTDIR/etc/edge-agent/mqtt"
if [ ! -e "$DESTDIR/etc/edge-agent/config.toml" ]; then
  sed -e 's#^state_dir = "var"#state_dir = "/var/lib/edge-agent"#' \
      -e 's|^# socket_path = .*|socket_path = "/run/edge-agent/edge-agent.sock"|' \
      -e 's|^# socket_group = .*|socket_group = "edge-agent-clients"|' \
      config.example.toml > "$DESTDIR/etc/edge-agent/.config.toml.tmp"
  # shellcheck disable=SC2046
  install -m 0644 $(owner root) "$DESTDIR/etc/edge-agent/.config.toml.tmp" "$DESTDIR/etc/edge-agent/config.toml"
  rm -f "$DESTDIR/etc/edge-agent/.config.toml.tmp"
  say "config written to /etc/edge-agent/config.toml"
else
  say "config /etc/edge-agent/config.toml kept"
fi
install -d -m 0755 "$DOCDIR"
install -m 0644 docs/operations.md "$DOCDIR/operations.md"

if [ -n "$DESTDIR" ]; then
  say "staged under $DESTDIR (no user, no systemctl)"
  exit 0
fi
if [ ! -d /run/systemd/system ]; then
  say "systemd is not running here: enable later with 'systemctl enable --now edge-agent.socket edge-agent.service'"
  exit 0
fi
systemctl daemon-reload
if [ "$START" = 1 ]; then
  systemctl enable --now edge-agent.socket
  systemctl enable --now edge-agent.service
  [ "$HUB" = 1 ] && systemctl enable --now edge-hub.service
  [ "$HUB" = 1 ] && systemctl enable edge-hub-crl.timer  # started once the PKI exists (docs)
  say "started; check with: systemctl status edge-agent && edge-agent status"
else
  systemctl enable edge-agent.socket edge-agent.service
  say "enabled (not started)"
fi
