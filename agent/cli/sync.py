"""``edge-agent sync status``: is this device set up for fleet sync, and where does it stand?

Read-only and offline: it checks the ``[hub]`` settings, that the client certificate's CN is the
device id (the broker's ACL allows nothing else), the enrollment, transfers in progress and the
audit backlog. Exit status 2 when the configuration cannot work, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _cert_cn(path: Path) -> str | None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def sync_status(settings: Any) -> tuple[dict[str, Any], list[str]]:
    """(facts, problems) about this device's sync setup."""
    from registry.device import DeviceRegistry
    from registry.exceptions import RegistryError

    h = settings.hub
    problems: list[str] = []
    facts: dict[str, Any] = {
        "enabled": h.host is not None,
        "broker": f"{h.host}:{h.port}" if h.host else None,
    }
    registry = DeviceRegistry(settings.state_dir)
    try:
        enrollment = registry.enrollment()
        facts["enrolled"] = {"device_id": enrollment.device_id, "groups": list(enrollment.groups)}
    except RegistryError as exc:
        facts["enrolled"] = None
        problems.append(str(exc))
        enrollment = None
    device_id = h.device_id or (enrollment.device_id if enrollment else None)
    facts["device_id"] = device_id
    if h.host is not None:
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(h, name)
            if path is None or not Path(path).is_file():
                problems.append(f"hub.{name} = {path}: file not found")
        if h.key_file is not None and Path(h.key_file).is_file():
            from fleet.errors import InsecureKeyFile
            from fleet.mqtt import check_private_key

            try:
                check_private_key(Path(h.key_file))
            except InsecureKeyFile as exc:
                problems.append(str(exc))
        if h.cert_file is not None and Path(h.cert_file).is_file():
            cn = _cert_cn(Path(h.cert_file))
            facts["certificate_cn"] = cn
            if cn != device_id:
                problems.append(f"the client certificate's CN is {cn!r}, not the device id {device_id!r}")
    facts["mirrors"] = list(h.mirrors)
    facts["max_download_bytes_per_s"] = h.max_download_bytes_per_s
    if h.download_window is not None:
        from agent.sync.gate import TransferGate

        gate = TransferGate(window=h.download_window)
        facts["download_window"] = {
            "window": h.download_window,
            "open_now": gate.window_open(),
            "opens_in_s": round(gate.opens_in_s()),
        }
    partial = settings.state_dir / "sync" / "partial"
    facts["transfers_in_progress"] = (
        {p.name.removesuffix(".part"): p.stat().st_size for p in partial.glob("*.part")}
        if partial.is_dir()
        else {}
    )
    if (
        facts["transfers_in_progress"]
        and "download_window" in facts
        and not facts["download_window"]["open_now"]
    ):
        facts["transfers_waiting"] = f"download window {h.download_window} (UTC) is closed"
    from agent.audit.store import audit_path

    audit_file = audit_path(settings.state_dir)
    if audit_file.is_file():
        from agent.audit.store import open_existing

        log = open_existing(audit_file)
        try:
            facts["audit_backlog"] = log.backlog()
        finally:
            log.close()
    return facts, problems


def cmd_sync_status(args: argparse.Namespace) -> int:
    from agent.cli.main import settings_from_args

    facts, problems = sync_status(settings_from_args(args))
    if args.json:
        print(json.dumps({**facts, "problems": problems}, indent=2))
    else:
        for key, value in facts.items():
            print(f"{key}: {value}")
        for p in problems:
            print(f"problem: {p}")
    return 2 if problems and facts["enabled"] else 0


def register(sub: Any) -> None:
    p = sub.add_parser("sync", help="fleet sync over MQTT").add_subparsers(dest="sync_cmd", required=True)
    s = p.add_parser("status", help="check the [hub] setup, enrollment, transfers and audit backlog")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_sync_status)


__all__ = ["cmd_sync_status", "register", "sync_status"]
