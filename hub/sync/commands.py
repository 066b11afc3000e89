"""``edge-hub serve | devices | deploy | policy push | audit query``: the fleet over MQTT.

Broker options default to environment variables (``EDGE_HUB_MQTT_HOST``, ``_PORT``, ``_CA``,
``_CERT``, ``_KEY``, ``_BACKOFF_MIN_S``, ``_BACKOFF_MAX_S``) so an operator sets them
once. Exit statuses: 0 ok, 1 runtime failure (broker
unreachable, a device reported a failure, timeout), 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from fleet.errors import FleetError
from fleet.messages import PREFIX, Event, Incoming, device_of
from fleet.mqtt import MqttClient, MqttConfig

_ENV = "EDGE_HUB_MQTT_"
HUB_SESSION_EXPIRY_S = 120
DEFAULT_BACKOFF = (0.5, 30.0)
"""The hub's reconnect backoff (``--backoff-min`` / ``--backoff-max``) when nothing is set."""
"""Hub clients keep their session (and shared subscriptions) across a broker restart or a short
outage, but a worker gone for longer stops receiving its share of the requests."""
DONE_STATUSES = {
    "activated": True,
    "policy_applied": True,
    "smoke_test_failed": False,
    "load_failed": False,
    "model_refused": False,
    "policy_refused": False,
    "metadata_refused": False,
    "not_found": False,
}


def add_broker_options(p: argparse.ArgumentParser, client_id: str = "hub") -> None:
    env = os.environ
    p.add_argument("--host", default=env.get(_ENV + "HOST", "127.0.0.1"), help="broker host")
    p.add_argument("--port", type=int, default=int(env.get(_ENV + "PORT", "8883")))
    p.add_argument("--ca", type=Path, default=_path(env.get(_ENV + "CA")), help="broker CA certificate")
    p.add_argument("--cert", type=Path, default=_path(env.get(_ENV + "CERT")), help="client certificate")
    p.add_argument("--key", type=Path, default=_path(env.get(_ENV + "KEY")), help="client key")
    p.add_argument("--client-id", default=client_id)
    p.add_argument(
        "--backoff-min",
        type=float,
        default=_float_env(_ENV + "BACKOFF_MIN_S", DEFAULT_BACKOFF[0]),
        help="seconds: first reconnect delay (the delay doubles per failed attempt, with jitter)",
    )
    p.add_argument(
        "--backoff-max",
        type=float,
        default=_float_env(_ENV + "BACKOFF_MAX_S", DEFAULT_BACKOFF[1]),
        help="seconds: longest reconnect delay",
    )


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise SystemExit(f"edge-hub: {name}={raw!r} is not a number of seconds") from None


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def mqtt_config(args: argparse.Namespace) -> MqttConfig:
    missing = [n for n in ("ca", "cert", "key") if getattr(args, n) is None]
    if missing:
        raise SystemExit(f"edge-hub: missing --{', --'.join(missing)} (or {_ENV}CA/CERT/KEY)")
    for n in ("ca", "cert", "key"):
        if not getattr(args, n).is_file():
            raise SystemExit(f"edge-hub: --{n} {getattr(args, n)}: no such file")
    if not 0 < args.backoff_min <= args.backoff_max:
        raise SystemExit(
            f"edge-hub: --backoff-min {args.backoff_min:g} / --backoff-max {args.backoff_max:g}: "
            "need 0 < min <= max"
        )
    return MqttConfig(
        host=args.host,
        port=args.port,
        client_id=args.client_id,
        ca_file=args.ca,
        cert_file=args.cert,
        key_file=args.key,
        backoff_min_s=args.backoff_min,
        backoff_max_s=args.backoff_max,
        session_expiry_s=HUB_SESSION_EXPIRY_S,
    )


def add_worker_options(p: argparse.ArgumentParser, role: str) -> None:
    """The options :func:`serve_config` reads beyond the broker's, repository and database: one
    definition for ``edge-hub serve`` and the worker processes it spawns (``hub.sync.worker``)."""
    p.add_argument("--role", choices=("all", "blobs"), default=role)
    p.add_argument("--blob-workers", type=int, default=0, help="extra processes answering chunk requests")
    p.add_argument("--timestamp-interval", type=float, default=6 * 3600.0, help="re-sign every N seconds")
    p.add_argument(
        "--rollout-interval", type=float, default=5.0, help="drive staged rollouts every N seconds"
    )
    p.add_argument(
        "--leave-timeout",
        type=float,
        default=20.0,
        help="seconds: on SIGTERM, the longest spent handling what the broker already gave this worker",
    )
    p.add_argument(
        "--worker-stale",
        type=float,
        default=15.0,
        help="seconds: a worker silent this long is gone; the leader takes its broker session over",
    )


def serve_config(args: argparse.Namespace) -> Any:
    from hub.sync.serve import ServeConfig

    return ServeConfig(
        repo=args.repo,
        db=args.db,
        mqtt=mqtt_config(args),
        role=args.role,
        blob_workers=args.blob_workers,
        timestamp_interval_s=args.timestamp_interval,
        passphrase=_passphrase(args),
        rollout_interval_s=args.rollout_interval,
        leave_timeout_s=_positive(args.leave_timeout, "--leave-timeout"),
        worker_stale_s=_stale(args.worker_stale),
    )


def _stale(value: float) -> float:
    from hub.sync.serve import LEADER_CHECK_S as check

    if not value > 2 * check:
        raise SystemExit(
            f"edge-hub: --worker-stale {value:g}: must be more than {2 * check:g} s "
            f"(twice the {check:g} s between a worker's registry renewals)"
        )
    return value


def _positive(value: float, option: str) -> float:
    if not value > 0:
        raise SystemExit(f"edge-hub: {option} {value:g}: must be a positive number of seconds")
    return value


def _passphrase(args: argparse.Namespace) -> bytes | None:
    """The key passphrase for the timestamp job: ``--passphrase-env``, else the variable named in
    the repository's ``repo.json`` (as ``edge-hub repo`` commands do)."""
    from registry.files import read_bounded
    from registry.keys import passphrase_from_env
    from registry.repository import CONFIG_NAME, RepoSettings

    var = getattr(args, "passphrase_env", None)
    config = Path(args.repo) / CONFIG_NAME
    if var is None and config.is_file():
        var = RepoSettings.from_json(read_bounded(config, 1 << 16)).passphrase_env
    return passphrase_from_env(var)


def shown(value: object, limit: int = 300) -> str:
    """A device-supplied value as safe terminal text: control characters (escape sequences,
    carriage returns) become ``?`` and rich markup (``[link=...]``, ``[/]``) is escaped, so a
    device can neither restyle, hide nor link text on the operator's terminal."""
    from rich.markup import escape

    text = "".join(ch if ch.isprintable() else "?" for ch in str(value)[:limit])
    return escape(text)


def _repo_dir(args: argparse.Namespace) -> Path:
    return Path(args.repo) if args.repo is not None else Path(os.environ.get("EDGE_HUB_REPO", "hub-repo"))


def _db(args: argparse.Namespace) -> str | Path:
    from hub.sync.db import db_target

    return db_target(args.db)


# --- commands --------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from fleet import log as fleet_log
    from hub.sync.serve import HubServer

    fleet_log.configure("info", "auto", service="edge-hub")
    args.repo = _repo_dir(args)
    args.db = _db(args)
    if not (args.repo / "metadata").is_dir():
        print(f"edge-hub: {args.repo} is not a repository (run `edge-hub repo init`)", file=sys.stderr)
        return 2
    return asyncio.run(HubServer(serve_config(args)).run())


def _open_store(args: argparse.Namespace) -> Any:
    from hub.sync.db import exists
    from hub.sync.store import HubStore

    db = _db(args)
    if not exists(db):
        print(f"edge-hub: no hub database at {db} (run `edge-hub serve` first)", file=sys.stderr)
        raise SystemExit(2)
    return HubStore(db)


def cmd_devices(args: argparse.Namespace) -> int:
    rows = _open_store(args).devices()
    if args.json:
        print(json.dumps([r.to_json_dict() for r in rows], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("device", "online", "groups", "model", "loaded", "policy", "audit", "backlog", "last sync")
    for r in rows:
        s = r.state
        table.add_row(
            shown(r.device),
            "[green]yes[/green]" if r.online else "[red]no[/red]",
            shown(",".join(s.groups)) if s else "",
            shown(s.selected_model or "") if s else "",
            shown(",".join(s.loaded_models)) if s else "",
            shown(s.policy_version or "") if s else "",
            str(r.audit_seq) + (f" [red]({shown(r.problem)})[/red]" if r.problem else ""),
            str(s.audit_backlog) if s else "",
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(s.last_sync)) if s and s.last_sync else "",
        )
    Console().print(table)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from hub.repo.commands import push_deployment

    pushed = push_deployment(args, "edge-hub deploy")
    if pushed is None:
        return 1
    repo, dep = pushed
    print(
        f"deployments/{dep.group}.json: {', '.join(m.model for m in dep.models)} "
        f"(targets v{repo.targets.signed.version})"
    )
    if args.wait <= 0:
        return 0
    return asyncio.run(_push_and_watch(args, repo.path, args.group, "deployment", f"models/{args.model}/"))


def cmd_policy_push(args: argparse.Namespace) -> int:
    from hub.repo.commands import open_repo
    from hub.sync.meta import repo_lock
    from registry.publish import add_policy

    with repo_lock(_repo_dir(args)):
        repo = open_repo(args)
        path = add_policy(repo, Path(args.file), args.name, tuple(args.group))
    print(f"published {path} for group(s) {', '.join(args.group)} (targets v{repo.targets.signed.version})")
    if args.wait <= 0:
        return 0
    group = args.group[0] if len(args.group) == 1 else None
    return asyncio.run(_push_and_watch(args, repo.path, group, "policy", path))


async def _push_and_watch(
    args: argparse.Namespace, repo_dir: Path, group: str | None, kind: str, target: str
) -> int:
    """Publish the new metadata at once and show devices' outcomes as a progress bar."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hub.sync.meta import MetaPublisher

    console = Console()
    expected: set[str] = set()
    db = _db(args)
    from hub.sync.db import exists

    if exists(db):
        from hub.sync.store import HubStore

        for row in HubStore(db).devices():
            if row.state is not None and (group is None or group in row.state.groups):
                expected.add(row.device)
    client = MqttClient(mqtt_config(args))
    outcomes: dict[str, Event] = {}
    changed = asyncio.Event()
    since = time.time()

    def on_event(msg: Incoming) -> None:
        try:
            device, _ = device_of(msg.topic)
            event = Event.decode(msg.payload)
        except FleetError:
            return
        if event.kind != kind or not event.target.startswith(target) or event.at < since - 5:
            return
        if event.status in DONE_STATUSES:
            outcomes[device] = event
            changed.set()

    try:
        await client.start()
        await client.wait_connected(10)
        await client.subscribe(f"{PREFIX}/devices/+/events", on_event)
        await MetaPublisher(client, repo_dir).sync()
        total = len(expected) or None
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task(f"{kind} -> {group or 'all groups'}", total=total)
            deadline = time.monotonic() + args.wait
            while time.monotonic() < deadline:
                progress.update(task, completed=len(outcomes))
                if expected and expected <= set(outcomes):
                    break
                changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), min(1.0, max(0.01, deadline - time.monotonic())))
            progress.update(task, completed=len(outcomes))
    except FleetError as exc:
        print(f"edge-hub: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.close(end_session=True)
    failed = {d: e for d, e in outcomes.items() if not DONE_STATUSES[e.status]}
    for device, event in sorted(outcomes.items()):
        colour = "red" if device in failed else "green"
        said = f"{shown(event.target)} {shown(event.detail)}"
        console.print(f"[{colour}]{shown(device)}: {shown(event.status)}[/{colour}] {said}")
    missing = sorted(expected - set(outcomes))
    if missing:
        console.print(f"[yellow]no outcome within {args.wait:g}s from: {', '.join(missing)}[/yellow]")
    return 1 if failed or missing else 0


def cmd_audit_query(args: argparse.Namespace) -> int:
    store = _open_store(args)
    records = store.audit_records(args.device, args.since, args.limit)
    if args.verify:
        count, problems = store.verify_device(args.device)
        print(json.dumps({"device": args.device, "records": count, "ok": not problems, "problems": problems}))
        return 0 if not problems else 1
    for r in records:
        print(json.dumps(r, sort_keys=True))
    return 0


# --- registration ----------------------------------------------------------------------------


def _repo_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", default=None, help="repository directory ($EDGE_HUB_REPO, else ./hub-repo)")
    p.add_argument("--passphrase-env", default=None, help="environment variable holding the key passphrase")


def _db_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db",
        default=None,
        help="hub database: a SQLite path or a postgresql:// URL ($EDGE_HUB_DB, else ./hub.db)",
    )


def _watch_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait", type=float, default=0.0, help="publish now and wait this long for devices' outcomes"
    )
    _db_opt(p)
    add_broker_options(p, client_id=f"operator-{os.getpid()}")


def _subparsers_of(parser: argparse.ArgumentParser) -> Any:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def register(sub: Any) -> None:
    from hub.sync import broker, certs

    p = sub.add_parser("certs", help="make the fleet's CAs and the broker's and clients' certificates")
    certs.add_arguments(p)
    p.set_defaults(func=certs.run)
    broker_sub = sub.add_parser("broker", help="the fleet's Mosquitto").add_subparsers(
        dest="broker_cmd", required=True
    )
    p = broker_sub.add_parser("install", help="render mosquitto/mosquitto.conf and lay out its files")
    broker.add_arguments(p)
    p.set_defaults(func=broker.run)
    p = broker_sub.add_parser("crl", help="copy the current CRLs and revoked list to the installed broker")
    broker.add_crl_arguments(p)
    p.set_defaults(func=broker.run_crl)

    p = sub.add_parser("serve", help="run the hub: metadata, blobs, audit, inventory over MQTT")
    _repo_opts(p)
    _db_opt(p)
    add_broker_options(p)
    add_worker_options(p, role="all")
    p.set_defaults(func=cmd_serve)

    from hub.rollout import commands as rollout_commands

    rollout_commands.register(sub, _repo_opts, _db_opt)

    p = sub.add_parser("devices", help="the fleet inventory")
    p.add_argument("--json", action="store_true")
    _db_opt(p)
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("deploy", help="make a group hold a model, publish, and watch devices switch")
    p.add_argument("--group", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--model-version", default=None)
    p.add_argument("--pin", action="store_true")
    p.add_argument("--window", default=None, help="maintenance window HH:MM-HH:MM (UTC)")
    p.add_argument(
        "--force",
        action="store_true",
        help="push even to boxes the model does not fit, and end a rollout of the model in the group",
    )
    p.add_argument(
        "--mirror",
        action="append",
        default=None,
        help="HTTP(S) mirror of the repo targets/ for the group (repeatable; replaces the list)",
    )
    _repo_opts(p)
    _watch_opts(p)
    p.set_defaults(func=cmd_deploy)

    policy = sub.choices.get("policy")
    policy_sub = _subparsers_of(policy) if policy is not None else None
    if policy_sub is None:
        policy_sub = sub.add_parser("policy", help="policies").add_subparsers(
            dest="policy_cmd", required=True
        )
    p = policy_sub.add_parser("push", help="publish a policy document and watch devices apply it")
    p.add_argument("file")
    p.add_argument("--name", default=None)
    p.add_argument(
        "--group",
        action="append",
        required=True,
        help="a group whose devices apply it (its deployment names the policy); repeat for more",
    )
    _repo_opts(p)
    _watch_opts(p)
    p.set_defaults(func=cmd_policy_push)

    audit = sub.add_parser("audit", help="audit records uploaded by devices").add_subparsers(
        dest="audit_cmd", required=True
    )
    p = audit.add_parser("query", help="print a device's records as JSON lines")
    p.add_argument("--device", required=True)
    p.add_argument("--since", default=None, help="ISO 8601 UTC time, e.g. 2026-01-31T00:00:00")
    p.add_argument("--limit", type=int, default=100_000)
    p.add_argument("--verify", action="store_true", help="check the stored chain instead of printing")
    _db_opt(p)
    p.set_defaults(func=cmd_audit_query)


__all__ = ["add_broker_options", "add_worker_options", "mqtt_config", "register", "serve_config", "shown"]
