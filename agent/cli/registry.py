"""``edge-agent enroll`` and ``edge-agent registry import|list|verify|remove|gc|retry``.

All of them work on ``<state_dir>/registry`` through :class:`registry.device.DeviceRegistry`, the
same verification path the MQTT sync uses. A refusal prints ``edge-agent: refused (<reason>):
<detail>`` and exits 1; bad input exits 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.cli.main import settings_from_args
from registry.device import DeviceRegistry
from registry.exceptions import ManifestError, Refused, RegistryError

Command = Callable[[argparse.Namespace], int]


def _registry(args: argparse.Namespace) -> DeviceRegistry:
    from agent.daemon.catalog import log_refusal

    return DeviceRegistry(settings_from_args(args).state_dir, on_refusal=log_refusal)


def _errors(func: Command) -> Command:
    @functools.wraps(func)
    def run(args: argparse.Namespace) -> int:
        from fleet import log

        log.configure("warning", "console", stream=sys.stderr)
        try:
            return func(args)
        except ManifestError as exc:
            print(f"edge-agent: {exc.detail}", file=sys.stderr)
            return 2
        except Refused as exc:
            print(f"edge-agent: refused ({exc.reason.value}): {exc.detail}", file=sys.stderr)
            return 1
        except RegistryError as exc:
            print(f"edge-agent: {exc}", file=sys.stderr)
            return 1

    return run


@_errors
def cmd_enroll(args: argparse.Namespace) -> int:
    try:
        root = Path(args.root).read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read {args.root}: {exc.strerror}") from None
    groups = tuple(g for item in args.group for g in item.split(",") if g)
    e = _registry(args).enroll(root, args.device_id, groups, force=args.force)
    print(f"enrolled {e.device_id} in {', '.join(e.groups)}; trust anchor sha256 {e.root_sha256[:16]}...")
    from fleet.device_key import ensure_device_key

    key = ensure_device_key(settings_from_args(args).state_dir)  # the key the audit log signs with
    print(f"audit key {key.public.raw.hex()}")
    print(
        f"register it at the hub: edge-hub device register {e.device_id} --audit-key {key.public.raw.hex()}"
    )
    return 0


@_errors
def cmd_import(args: argparse.Namespace) -> int:
    result = _registry(args).import_bundle(Path(args.bundle))
    print(
        f"imported targets v{result.targets_version}: {len(result.installed)} installed, "
        f"{len(result.already)} already present, {len(result.skipped)} not for this device"
    )
    for path in result.installed:
        print(f"  + {path}")
    return 0


def _isolation(args: argparse.Namespace) -> Any:
    from agent.engine.isolation import Isolation, current_build

    state = settings_from_args(args).state_dir
    return Isolation(state / "isolation", build=current_build(), fingerprint=lambda info: "", runner=None)


def _model_rows(reg: DeviceRegistry, refused: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per installed model version; ``refused`` maps a file sha256 to its crash-isolation
    refusal under this build (any engine settings)."""
    refused = refused or {}
    rows = []
    for m in reg.models():
        man = m.manifest
        rows.append(
            {
                "id": man.id,
                "version": man.version,
                "format": man.format,
                "task": man.task,
                "family": man.family,
                "parameters": man.parameters,
                "size_class": man.size_class,
                "quantization": man.quantization,
                "size_bytes": man.file_size,
                "sha256": man.sha256,
                "path": m.target.path,
                "blob": str(reg.store.path(man.sha256)),
                "companions": [c.path for c in m.companions],
                "installed_at": m.target.installed_at,
                "refused": refused[man.sha256].to_dict() if man.sha256 in refused else None,
            }
        )
    return rows


@_errors
def cmd_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    rows = _model_rows(reg, {v.sha256: v for v in reversed(_isolation(args).refused())})
    enrollment = reg.enrollment() if reg.enrolled else None
    if args.json:
        docs = [t.path for t in reg.index().targets.values() if t.kind in ("policy", "deployment")]
        print(
            json.dumps(
                {
                    "device_id": enrollment.device_id if enrollment else None,
                    "groups": list(enrollment.groups) if enrollment else [],
                    "models": rows,
                    "documents": sorted(docs),
                },
                indent=2,
            )
        )
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if enrollment is None:
        console.print("not enrolled (edge-agent enroll --root root.json --device-id ID --group G)")
    else:
        console.print(f"device {enrollment.device_id}, groups {', '.join(enrollment.groups)}")
    table = Table("model", "version", "format", "task", "params", "quant", "size", "runs here")
    for r in rows:
        refusal = r["refused"]
        table.add_row(
            r["id"],
            r["version"],
            r["format"],
            r["task"],
            f"{r['parameters'] / 1e6:.0f}M ({r['size_class']})",
            r["quantization"],
            f"{r['size_bytes'] / 2**20:.1f} MiB",
            f"[red]refused: {refusal['reason']}[/red]" if refusal else "-",
        )
    console.print(table)
    for r in rows:
        if r["refused"]:
            console.print(
                f"{r['id']} {r['version']}: {r['refused']['detail']} (edge-agent registry retry {r['id']})"
            )
    return 0


@_errors
def cmd_retry(args: argparse.Namespace) -> int:
    """Forget crash isolation's refusals (of one model, or all) so they are tried again."""
    count = _isolation(args).forget(None if args.all else args.model_id)
    target = "all models" if args.all else args.model_id
    print(f"forgot {count} refusal(s) of {target}; restart or reload the service to try again")
    return 0


@_errors
def cmd_verify(args: argparse.Namespace) -> int:
    result = _registry(args).verify()
    for path in result.ok:
        print(f"ok   {path}")
    for path, why in result.bad:
        print(f"BAD  {path}: {why} (removed; import again to restore)")
    return 1 if result.bad else 0


@_errors
def cmd_remove(args: argparse.Namespace) -> int:
    for path in _registry(args).remove(args.model_id):
        print(f"removed {path}")
    return 0


@_errors
def cmd_gc(args: argparse.Namespace) -> int:
    removed = _registry(args).gc()
    print(f"removed {len(removed)} unreferenced files")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("enroll", help="trust a repository root and set this device's identity")
    p.add_argument("--root", required=True, help="the fleet's root.json (trust anchor)")
    p.add_argument("--device-id", required=True)
    p.add_argument("--group", action="append", required=True, help="group (repeat or comma-separate)")
    p.add_argument("--force", action="store_true", help="replace an enrollment with another root")
    p.set_defaults(func=cmd_enroll)

    reg = sub.add_parser("registry", help="the local signed model store").add_subparsers(
        dest="registry_cmd", required=True
    )
    p = reg.add_parser("import", help="verify and install a bundle (directory or .tar)")
    p.add_argument("bundle")
    p.set_defaults(func=cmd_import)
    p = reg.add_parser("list", help="installed models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)
    p = reg.add_parser("verify", help="re-hash every installed blob")
    p.set_defaults(func=cmd_verify)
    p = reg.add_parser("remove", help="remove every version of a model")
    p.add_argument("model_id")
    p.set_defaults(func=cmd_remove)
    p = reg.add_parser("gc", help="delete unreferenced blobs and stale temp files")
    p.set_defaults(func=cmd_gc)
    p = reg.add_parser("retry", help="forget crash isolation's refusal of a model: try it again")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("model_id", nargs="?")
    which.add_argument("--all", action="store_true", help="every refused model")
    p.set_defaults(func=cmd_retry)


__all__ = ["register"]
