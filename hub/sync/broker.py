"""``edge-hub broker install``: lay out the fleet's Mosquitto as the shipped files describe it.

The shipped ``mosquitto/mosquitto.conf`` has ``{placeholders}``; :func:`install` fills them, copies
the CA certificates, the broker's certificate and key, the CRLs and revoked list, the ACL and the
broker plugin (``mosquitto/edge_acl.c``, built by ``mosquitto/build-plugin.sh`` unless a built one
is given) next to the rendered config, and creates the persistence directory.
:func:`install_revocation` (``edge-hub broker crl``) copies the revocation files again after
``edge-hub device revoke|rotate|crl``; the broker reads them on SIGHUP. The tests install their
broker through the same function (tests/sync/broker.py), then start ``mosquitto -c
<dest>/mosquitto.conf`` as the docs say.

Invariants:
- Every placeholder of the template is filled and every value names a placeholder the template
  has: a missing or unknown one is refused by name (:class:`BrokerSetupError`), never left in.
- Started as root, Mosquitto reads its certificates, key and ACL only after dropping to ``user``.
  When this runs as root, ``dest`` and the files in it are ``root:<user's group>``, directories
  0750 and files 0640 (the key too: readable by the broker, by no one else), the persistence
  directory ``<user>:<group>`` 0700; every directory above them must be searchable by that user,
  else the install is refused naming the directory. Run as another user, Mosquitto does not change
  user, so the files stay that user's (0600/0700).
- Nothing is half-written: each file is written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
PKI_FILES = ("ca.crt", "service-ca.crt", "broker.crt", "broker.key", "crl.pem", "service-crl.pem")
REVOCATION_FILES = ("crl.pem", "service-crl.pem")
REVOKED_LIST = "revoked.txt"
PLUGIN = "edge_acl.so"


class BrokerSetupError(Exception):
    """The broker cannot be laid out as asked; the message names what and why."""


@dataclass(frozen=True, slots=True)
class BrokerLayout:
    """Where an installed broker's files are."""

    config: Path
    certdir: Path
    acl: Path
    data: Path
    plugin: Path


def render(template: str, values: dict[str, str]) -> str:
    """``template`` with every ``{name}`` replaced; refuses missing and unknown names."""
    names = set(PLACEHOLDER.findall(template))
    missing = sorted(names - values.keys())
    unknown = sorted(values.keys() - names)
    if missing:
        raise BrokerSetupError(f"no value for placeholder(s) {', '.join(missing)} in the broker config")
    if unknown:
        raise BrokerSetupError(f"the broker config has no placeholder(s) {', '.join(unknown)}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def _write(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _directory(path: Path, mode: int, owner: tuple[int, int] | None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, *owner)


def _searchable(path: Path, uid: int, gids: set[int]) -> bool:
    st = path.stat()
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _check_reachable(path: Path, user: str, uid: int, gids: set[int]) -> None:
    resolved = path.resolve()
    for parent in (*reversed(resolved.parents), resolved):
        if not _searchable(parent, uid, gids):
            raise BrokerSetupError(
                f"{parent} is not searchable by {user}: Mosquitto reads its files after dropping to "
                f"that user (make it 0755, or install somewhere else)"
            )


def _owner_of(user: str) -> tuple[int, int] | None:
    """``(root, user's group)`` when running as root (Mosquitto reads as ``user``), else None."""
    if os.geteuid() != 0:
        return None
    try:
        return (0, pwd.getpwnam(user).pw_gid)
    except KeyError:
        raise BrokerSetupError(f"no user {user!r} (the Debian package creates `mosquitto`)") from None


def install_revocation(pki: Path, certdir: Path, *, user: str = "mosquitto") -> list[Path]:
    """Copy the CRLs and the revoked list from ``pki`` into an installed broker's ``certdir``
    (atomically, with the install's owner and mode); an absent revoked list is written empty.
    Returns the files written. The broker reads them on SIGHUP."""
    missing = [n for n in REVOCATION_FILES if not (pki / n).is_file()]
    if missing:
        raise BrokerSetupError(f"{pki} lacks {', '.join(missing)} (make them with `edge-hub certs {pki}`)")
    if not certdir.is_dir():
        raise BrokerSetupError(f"{certdir}: no installed broker there (run `edge-hub broker install` first)")
    owner = _owner_of(user)
    mode = 0o640 if owner is not None else 0o600
    written = []
    for name in (*REVOCATION_FILES, REVOKED_LIST):
        src = pki / name
        _write(certdir / name, src.read_bytes() if src.is_file() else b"", mode, owner)
        written.append(certdir / name)
    return written


def build_plugin(source: Path, out: Path) -> Path:
    """Build ``source/edge_acl.c`` into ``out`` with ``source/build-plugin.sh`` (a C compiler and
    Debian's ``mosquitto-dev`` headers); :class:`BrokerSetupError` with the compiler's output."""
    script = source / "build-plugin.sh"
    if not script.is_file():
        raise BrokerSetupError(f"{script}: no such file (--source is the checkout's mosquitto/ directory)")
    done = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BrokerSetupError(
            f"building the broker plugin failed (needs cc and mosquitto-dev): {done.stderr.strip()[-2000:]}"
        )
    return out


def install(
    source: Path,
    pki: Path,
    dest: Path,
    *,
    port: int = 8883,
    bind: str = "127.0.0.1",
    service_port: int = 8884,
    service_bind: str = "127.0.0.1",
    data: Path | None = None,
    user: str = "mosquitto",
    plugin: Path | None = None,
    extra: dict[str, str] | None = None,
) -> BrokerLayout:
    """Render ``source/mosquitto.conf`` into ``dest`` with ``source/acl``, the broker's files from
    ``pki`` (``edge-hub certs``) and the plugin (``plugin``, a built ``edge_acl.so``, else built
    from ``source``); see the module docstring for owners and modes. ``extra`` gives values for
    placeholders beyond the listeners, files and user (checked like the rest)."""
    template_path, acl_source = source / "mosquitto.conf", source / "acl"
    for need in (template_path, acl_source):
        if not need.is_file():
            raise BrokerSetupError(f"{need}: no such file (--source is the checkout's mosquitto/ directory)")
    missing = [n for n in PKI_FILES if not (pki / n).is_file()]
    if missing:
        raise BrokerSetupError(f"{pki} lacks {', '.join(missing)} (make them with `edge-hub certs {pki}`)")
    if port == service_port:
        raise BrokerSetupError(f"the device and service listeners need two ports, both are {port}")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise BrokerSetupError(f"no user {user!r} (the Debian package creates `mosquitto`)") from None
    as_root = os.geteuid() == 0
    files_owner = (0, entry.pw_gid) if as_root else None
    data_owner = (entry.pw_uid, entry.pw_gid) if as_root else None
    dest = dest.absolute()
    data = (data or dest / "data").absolute()
    certdir = dest / "certs"
    dir_mode, file_mode = (0o750, 0o640) if as_root else (0o700, 0o600)
    _directory(dest, dir_mode, files_owner)
    _directory(certdir, dir_mode, files_owner)
    _directory(data, 0o700, data_owner)
    if as_root:
        gids = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
        for path in (certdir, data):
            _check_reachable(path, user, entry.pw_uid, gids)
    for name in PKI_FILES:
        _write(certdir / name, (pki / name).read_bytes(), file_mode, files_owner)
    install_revocation(pki, certdir, user=user)
    plugin_dest = dest / PLUGIN
    if plugin is None:
        with tempfile.TemporaryDirectory() as tmp:
            plugin = build_plugin(source, Path(tmp) / PLUGIN)
            _write(plugin_dest, plugin.read_bytes(), 0o644 if files_owner is None else 0o640, files_owner)
    else:
        _write(plugin_dest, plugin.read_bytes(), 0o644 if files_owner is None else 0o640, files_owner)
    acl = dest / "acl"
    _write(acl, acl_source.read_bytes(), file_mode, files_owner)
    values = {
        "port": str(port),
        "bind": bind,
        "service_port": str(service_port),
        "service_bind": service_bind,
        "certdir": str(certdir),
        "acl": str(acl),
        "persistence": str(data),
        "user": user,
        "plugin": str(plugin_dest),
        **(extra or {}),
    }
    config = dest / "mosquitto.conf"
    _write(config, render(template_path.read_text(), values).encode(), file_mode, files_owner)
    return BrokerLayout(config, certdir, acl, data, plugin_dest)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pki", type=Path, required=True, help="the directory `edge-hub certs` wrote")
    p.add_argument("--dest", type=Path, default=Path("/etc/mosquitto/edge"), help="config, ACL, certificates")
    p.add_argument("--data", type=Path, default=Path("/var/lib/mosquitto/edge"), help="persistence directory")
    p.add_argument(
        "--source", type=Path, default=Path("mosquitto"), help="the checkout's mosquitto/ directory"
    )
    p.add_argument("--port", type=int, default=8883, help="device listener port")
    p.add_argument("--bind", default="127.0.0.1", help="device listener address (0.0.0.0 for a fleet)")
    p.add_argument("--service-port", type=int, default=8884, help="hub and operator listener port")
    p.add_argument("--service-bind", default="127.0.0.1", help="hub and operator listener address")
    p.add_argument("--user", default="mosquitto", help="the user Mosquitto drops to when started as root")
    p.add_argument(
        "--plugin", type=Path, default=None, help="a built edge_acl.so (default: build mosquitto/edge_acl.c)"
    )


def add_crl_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pki", type=Path, required=True, help="the directory `edge-hub certs` wrote")
    p.add_argument("--dest", type=Path, default=Path("/etc/mosquitto/edge"), help="the installed broker")
    p.add_argument("--user", default="mosquitto", help="the user Mosquitto drops to when started as root")


def run_crl(args: argparse.Namespace) -> int:
    """``edge-hub broker crl``: hand the broker the current CRLs and revoked list."""
    try:
        written = install_revocation(args.pki, args.dest / "certs", user=args.user)
    except (BrokerSetupError, OSError) as exc:
        print(f"edge-hub broker crl: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, BrokerSetupError) else 1
    print(f"copied {', '.join(p.name for p in written)} to {args.dest / 'certs'}; reload the broker (SIGHUP)")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        layout = install(
            args.source,
            args.pki,
            args.dest,
            port=args.port,
            bind=args.bind,
            service_port=args.service_port,
            service_bind=args.service_bind,
            data=args.data,
            user=args.user,
            plugin=args.plugin,
        )
    except (BrokerSetupError, OSError) as exc:
        print(f"edge-hub broker install: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, BrokerSetupError) else 1
    print(f"broker config in {layout.config}; start it with: mosquitto -c {layout.config}")
    return 0


MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"

__all__ = [
    "MOSQUITTO",
    "PKI_FILES",
    "PLUGIN",
    "REVOCATION_FILES",
    "BrokerLayout",
    "BrokerSetupError",
    "add_arguments",
    "add_crl_arguments",
    "build_plugin",
    "install",
    "install_revocation",
    "render",
    "run",
    "run_crl",
]
