"""``edge-hub device issue|revoke|rotate|crl|list|register``: the fleet's client certificates and
the devices' audit keys.

``register ID --audit-key HEX`` records the device's audit public key (printed by ``edge-agent
enroll``) in the hub database (``--db``, else ``$EDGE_HUB_DB``, else ``./hub.db``); the hub stores
no audit record of a device without one (:mod:`hub.sync.store`).


They work on the CA directory (``--pki``, default ``$EDGE_HUB_PKI`` else ``/etc/edge-hub/pki``)
through :mod:`hub.sync.certs`. Revoking or rotating re-signs ``crl.pem``; the broker reads it at
start and on SIGHUP (``systemctl reload mosquitto``), after which the revoked certificates cannot
connect. A connection already open stays until it drops: restart the broker to cut it at once
(persistent sessions and retained metadata survive a restart).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from hub.sync.certs import CLIENT_DAYS, PkiError, issue, load_index, revoke, rotate, write_crl

DEFAULT_PKI = Path("/etc/edge-hub/pki")
RELOAD_HINT = "reload the broker so it reads the new CRL: systemctl reload mosquitto (SIGHUP)"


def _pki(args: argparse.Namespace) -> Path:
    if args.pki is not None:
        return Path(args.pki)
    return Path(os.environ.get("EDGE_HUB_PKI", str(DEFAULT_PKI)))


def _fail(exc: Exception) -> int:
    print(f"edge-hub: {exc}")
    return 1


def cmd_issue(args: argparse.Namespace) -> int:
    try:
        paths = issue(_pki(args), args.device, dest=args.out, days=args.days)
    except PkiError as exc:
        return _fail(exc)
    print(f"issued {paths.cert} and {paths.key} (valid {args.days} days); install them on the device")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    try:
        serials = revoke(_pki(args), args.device)
    except PkiError as exc:
        return _fail(exc)
    print(f"revoked {len(serials)} certificate(s) of {args.device}; {RELOAD_HINT}")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    try:
        paths, serials = rotate(
            _pki(args), args.device, dest=args.out, days=args.days, keep_previous=args.keep_previous
        )
    except PkiError as exc:
        return _fail(exc)
    print(f"new certificate {paths.cert} and key {paths.key} for {args.device}")
    if serials:
        print(f"revoked {len(serials)} older certificate(s); install the new files, then {RELOAD_HINT}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from fleet.errors import DeviceKeyError, ProtocolError
    from hub.sync.db import db_target, describe
    from hub.sync.store import HubStore

    db = db_target(args.db)
    try:
        HubStore(db).register_key(args.device, args.audit_key)
    except (DeviceKeyError, ProtocolError) as exc:
        print(f"edge-hub: {exc}")
        return 2
    print(f"audit key {args.audit_key[:16]}... registered for {args.device} in {describe(db)}")
    return 0


def cmd_crl(args: argparse.Namespace) -> int:
    path = write_crl(_pki(args), days=args.days)
    print(f"{path} signed, valid {args.days} days; {RELOAD_HINT}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    now = dt.datetime.now(dt.UTC)
    rows: list[dict[str, Any]] = []
    for entry in load_index(_pki(args))["certificates"]:
        if entry.get("server"):
            continue
        expired = dt.datetime.fromisoformat(entry["not_after"]) <= now
        state = "revoked" if entry.get("revoked_at") else ("expired" if expired else "valid")
        rows.append(
            {"cn": entry["cn"], "serial": entry["serial"], "not_after": entry["not_after"], "state": state}
        )
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        for r in rows:
            print(f"{r['cn']:<24} {r['state']:<8} until {r['not_after'][:19]}  serial {r['serial']}")
    return 0


def register(sub: Any) -> None:
    device = sub.add_parser("device", help="device client certificates: issue, revoke, rotate, CRL")
    dsub = device.add_subparsers(dest="device_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--pki", type=Path, default=None, help="CA directory (default $EDGE_HUB_PKI)")

    p = dsub.add_parser("issue", help="a key and client certificate for a device (CN = device id)")
    p.add_argument("device")
    common(p)
    p.add_argument("--days", type=int, default=CLIENT_DAYS)
    p.add_argument("--out", type=Path, default=None, help="where to write <id>.crt/.key")
    p.set_defaults(func=cmd_issue)

    p = dsub.add_parser("revoke", help="revoke every certificate of a device and re-sign the CRL")
    p.add_argument("device")
    common(p)
    p.set_defaults(func=cmd_revoke)

    p = dsub.add_parser("rotate", help="a new key and certificate; older ones are revoked")
    p.add_argument("device")
    common(p)
    p.add_argument("--days", type=int, default=CLIENT_DAYS)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--keep-previous", action="store_true", help="do not revoke the older certificates yet")
    p.set_defaults(func=cmd_rotate)

    p = dsub.add_parser("register", help="register a device's audit public key (from edge-agent enroll)")
    p.add_argument("device")
    p.add_argument("--audit-key", required=True, help="Ed25519 public key, hex")
    p.add_argument("--db", default=None, help="hub database ($EDGE_HUB_DB, else ./hub.db)")
    p.set_defaults(func=cmd_register)

    p = dsub.add_parser("crl", help="re-sign the CRL (run well within its validity, e.g. weekly)")
    common(p)
    p.add_argument("--days", type=int, default=30)
    p.set_defaults(func=cmd_crl)

    p = dsub.add_parser("list", help="certificates issued, with their state")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)


__all__ = ["register"]
