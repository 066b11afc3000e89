"""``edge-agent audit tail|verify|export`` and ``edge-agent policy show|check USER ACTION RESOURCE``.

The audit commands read ``<state_dir>/audit/audit.db`` directly (they need the file permissions
of the daemon's user; root can always), except ``tail --via-socket``, which asks the daemon and
needs the ``audit.read`` permission instead. ``verify`` exits 0 when the chain and every checkpoint
hold, 1 naming the first problem otherwise. ``export`` exits 2 for ``--mark-uploaded`` without
``--output`` and 1 when the output cannot be written. ``policy check`` exits 0 when allowed, 1 when denied,
2 for an unknown action.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.errors import ConfigError


def _log(args: argparse.Namespace) -> Any:
    from agent.audit.store import audit_path, open_existing
    from agent.cli.main import settings_from_args

    settings = settings_from_args(args)
    path = args.db if getattr(args, "db", None) else audit_path(settings.state_dir)
    return settings, open_existing(path, settings)


def _line(record: dict[str, Any]) -> str:
    actor = record.get("actor") or {}
    who = actor.get("user") or actor.get("key_id") or actor.get("agent") or "?"
    if actor.get("uid") is not None:
        who = f"{who}({actor['uid']})"
    details = record.get("details") or {}
    extra = " ".join(
        f"{k}={details[k]}" for k in ("status", "model", "completion_tokens", "latency_ms") if k in details
    )
    resource = record.get("resource") or "-"
    return (
        f"{record['seq']:>8} {record['time']} {who:<16} {record['action']:<14} {resource:<24} "
        f"{record['outcome']:<9} {record['reason']} {extra}".rstrip()
    )


def _tail_over_socket(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``GET /admin/audit``: for callers granted ``audit.read`` who cannot read the file."""
    from agent.cli.client import LocalClient
    from agent.cli.main import settings_from_args

    settings = settings_from_args(args)
    with LocalClient(args.socket or settings.socket_path, timeout=30.0) as client:
        data: list[dict[str, Any]] = client.get(f"/admin/audit?n={args.n}")["data"]
    return data


def cmd_tail(args: argparse.Namespace) -> int:
    if args.via_socket:
        records = _tail_over_socket(args)
    else:
        _, log = _log(args)
        records = [sealed.record() for sealed in log.tail(args.n)]
    for record in records:
        print(json.dumps(record, sort_keys=True) if args.json else _line(record))
    return 0


def _keys(args: argparse.Namespace, state_dir: Path) -> list[Any]:
    from fleet.device_key import PUB_FILE, keys_dir, load_public_key

    if args.public_key is not None:
        return [load_public_key(args.public_key)]
    pub = keys_dir(state_dir) / PUB_FILE
    return [load_public_key(pub)] if pub.exists() else []


def cmd_verify(args: argparse.Namespace) -> int:
    settings, log = _log(args)
    report = log.verify(_keys(args, settings.state_dir))
    if args.json:
        print(
            json.dumps(
                {
                    "ok": report.ok,
                    "records": report.records,
                    "checkpoints": report.checkpoints,
                    "first_seq": report.first_seq,
                    "last_seq": report.last_seq,
                    "problems": [
                        {"kind": p.kind, "seq": p.seq, "message": p.message} for p in report.problems
                    ],
                },
                indent=2,
            )
        )
    elif report.ok:
        print(
            f"audit log OK: records {report.first_seq}..{report.last_seq} ({report.records}), "
            f"{report.checkpoints} signed checkpoint(s)"
        )
    else:
        first = report.problems[0]
        print(f"audit log BROKEN: {first.message}", file=sys.stderr)
        for p in report.problems[1:]:
            print(f"  also: {p.message}", file=sys.stderr)
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    """JSON lines: the anchor, every record after ``--since-seq``, then every checkpoint."""
    from agent.audit.store import AuditError

    if args.mark_uploaded and args.output is None:
        print("edge-agent: --mark-uploaded needs --output (a file, fsynced first)", file=sys.stderr)
        return 2
    _, log = _log(args)
    try:
        last = _write_export(log, args)
    except OSError as exc:
        raise AuditError(f"cannot write {args.output or 'stdout'}: {exc.strerror or exc}") from None
    if args.mark_uploaded and last:
        marked = log.mark_uploaded(last)
        pruned = log.prune_uploaded()
        print(
            f"exported and marked uploaded up to record {marked}; pruned {pruned} record(s)", file=sys.stderr
        )
    return 0


def _write_export(log: Any, args: argparse.Namespace) -> int:
    """Write the export to ``--output`` (fsynced with ``--mark-uploaded``) or stdout; the last seq."""
    out = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    last = 0
    try:
        anchor_seq, anchor_hash = log.anchor()
        out.write(json.dumps({"type": "anchor", "seq": anchor_seq, "hash": anchor_hash}) + "\n")
        for sealed in log.iter_records(args.since_seq):
            record = {"type": "record", "seq": sealed.seq, "hash": sealed.hash, "body": sealed.body}
            out.write(json.dumps(record) + "\n")
            last = sealed.seq
        for cp in log.checkpoints():
            checkpoint = {"type": "checkpoint", "seq": cp.seq, "body": cp.body, "signature": cp.signature}
            out.write(json.dumps(checkpoint) + "\n")
        if args.mark_uploaded:
            out.flush()
            os.fsync(out.fileno())
    finally:
        if out is not sys.stdout:
            out.close()
    return last


def _policy(args: argparse.Namespace) -> Any:
    """The policy in force; an unusable policy file is a configuration error (exit status 2)."""
    from agent.cli.main import settings_from_args
    from agent.policy import PolicyError, effective_policy

    try:
        return effective_policy(settings_from_args(args))
    except PolicyError as exc:
        raise ConfigError(str(exc)) from None


def cmd_policy_show(args: argparse.Namespace) -> int:
    from agent.policy import policy_to_dict

    policy = _policy(args)
    doc = policy_to_dict(policy)
    doc["source"] = policy.source
    print(json.dumps(doc, indent=2))
    return 0


def subject_for(user: str) -> Any:
    """A :class:`~agent.access.Subject` for a user name or numeric uid, with its groups."""
    import grp
    import pwd

    from agent.access import Subject

    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        return Subject(uid=int(user) if user.isdigit() else None, user=None if user.isdigit() else user)
    groups: list[str] = []
    for gid in os.getgrouplist(entry.pw_name, entry.pw_gid):
        try:
            name = grp.getgrgid(gid).gr_name
        except KeyError:
            name = str(gid)
        if name not in groups:
            groups.append(name)
    return Subject(uid=entry.pw_uid, gid=entry.pw_gid, user=entry.pw_name, groups=tuple(groups))


def cmd_policy_check(args: argparse.Namespace) -> int:
    from agent.access import Action, decide

    try:
        action = Action(args.action)
    except ValueError:
        known = ", ".join(a.value for a in Action)
        print(f"edge-agent: unknown action {args.action!r} (known: {known})", file=sys.stderr)
        return 2
    policy = _policy(args)
    subject = subject_for(args.user)
    resource = None if args.resource in ("", "-") else args.resource
    decision = decide(subject, action, resource, policy)
    verdict = "ALLOW" if decision.allowed else "DENY"
    roles = ", ".join(decision.roles) or "none"
    print(f"{verdict}: {decision.reason} (roles: {roles}; policy: {policy.source})")
    if decision.allowed and (decision.limits.max_tokens or decision.limits.requests_per_minute):
        print(
            f"  limits: max_tokens={decision.limits.max_tokens} "
            f"requests_per_minute={decision.limits.requests_per_minute}"
        )
    return 0 if decision.allowed else 1


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="read and verify the tamper-evident audit log")
    asub = audit.add_subparsers(dest="audit_command", required=True)

    p = asub.add_parser("tail", help="show the newest records")
    p.add_argument("-n", type=int, default=20)
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--via-socket",
        action="store_true",
        help="ask the daemon (needs the audit.read permission) instead of reading the file",
    )
    p.add_argument("--socket", type=Path, default=None)
    p.add_argument(
        "--db", type=Path, default=None, help="audit database (default: <state_dir>/audit/audit.db)"
    )
    p.set_defaults(func=cmd_tail)

    p = asub.add_parser("verify", help="check the hash chain and the signed checkpoints")
    p.add_argument(
        "--public-key", type=Path, default=None, help="device public key (hex) or private key (PEM)"
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--db", type=Path, default=None)
    p.set_defaults(func=cmd_verify)

    p = asub.add_parser("export", help="write records and checkpoints as JSON lines")
    p.add_argument("--since-seq", type=int, default=0)
    p.add_argument("--output", "-o", type=Path, default=None)
    p.add_argument(
        "--mark-uploaded",
        action="store_true",
        help="air-gapped boxes: count the exported records as uploaded, so they can be pruned",
    )
    p.add_argument("--db", type=Path, default=None)
    p.set_defaults(func=cmd_export)

    policy = sub.add_parser("policy", help="show the access policy or check a decision")
    psub = policy.add_subparsers(dest="policy_command", required=True)
    p = psub.add_parser("show", help="print the policy in force (JSON)")
    p.set_defaults(func=cmd_policy_show)
    p = psub.add_parser("check", help="would USER be allowed ACTION on RESOURCE (a model id, or -)?")
    p.add_argument("user", help="user name or uid")
    p.add_argument("action")
    p.add_argument("resource", nargs="?", default="-")
    p.set_defaults(func=cmd_policy_check)


__all__ = [
    "cmd_export",
    "cmd_policy_check",
    "cmd_policy_show",
    "cmd_tail",
    "cmd_verify",
    "register",
    "subject_for",
]
