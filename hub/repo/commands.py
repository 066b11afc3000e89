"""``edge-hub repo|model|policy|deployment|root|key|timestamp|bundle ...``: the signed registry.

The repository directory comes from ``--repo`` (default ``$EDGE_HUB_REPO``, else ``./hub-repo``).
Encrypted keys are unlocked with the passphrase in the environment variable named at ``repo init
--passphrase-env VAR`` (recorded in ``repo.json``) or given again with ``--passphrase-env``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from registry.exceptions import ManifestError
from registry.files import read_bounded
from registry.keys import passphrase_from_env
from registry.metadata import Deployment
from registry.repository import CONFIG_NAME, ROLES, RepoSettings, Repository


def _repo_dir(args: argparse.Namespace) -> Path:
    if getattr(args, "repo", None) is not None:
        return Path(args.repo)
    return Path(os.environ.get("EDGE_HUB_REPO", "hub-repo"))


def open_repo(args: argparse.Namespace) -> Repository:
    path = _repo_dir(args)
    var = getattr(args, "passphrase_env", None)
    if var is None and (path / CONFIG_NAME).is_file():
        var = RepoSettings.from_json(read_bounded(path / CONFIG_NAME, 1 << 16)).passphrase_env
    return Repository.open(path, passphrase_from_env(var))


def _text_arg(value: str | None) -> str | None:
    """``@file`` reads the text from a file."""
    if value is not None and value.startswith("@"):
        try:
            return Path(value[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"cannot read {value[1:]}: {exc}") from None
    return value


def cmd_repo_init(args: argparse.Namespace) -> int:
    passphrase = passphrase_from_env(args.passphrase_env)
    repo = Repository.init(
        Path(args.dir),
        root_threshold=args.root_threshold,
        root_keys=args.root_keys,
        passphrase=passphrase,
        passphrase_env=args.passphrase_env,
    )
    print(f"repository created in {repo.path}")
    print(f"  root: {args.root_threshold} of {args.root_keys} keys; targets, snapshot, timestamp: 1 key each")
    print(
        f"  keys: {repo.path / 'keys'} (0600{', encrypted' if passphrase else ''}) - "
        "keep the root keys offline"
    )
    print(f"  trust anchor for devices: {repo.path / 'metadata' / '1.root.json'}")
    return 0


def cmd_model_add(args: argparse.Namespace) -> int:
    from registry.publish import Companion, add_model

    repo = open_repo(args)
    companions = [Companion(Path(p), args.companion_purpose) for p in args.companion or []]
    manifest = add_model(
        repo,
        Path(args.file),
        model_id=args.id,
        version=args.model_version,
        task=args.task,
        chat_template=_text_arg(args.chat_template),
        licence=args.licence,
        family=args.family,
        min_cpu_features=tuple(f for f in (args.min_cpu_features or "").split(",") if f),
        companions=companions,
    )
    if args.json:
        print(json.dumps(manifest.to_json_dict(), indent=2))
        return 0
    print(
        f"published {manifest.target_path}: {manifest.family}, {manifest.parameters / 1e6:.0f}M parameters "
        f"({manifest.size_class}), {manifest.quantization}, {manifest.format}, task {manifest.task}, "
        f"{manifest.file_size / 2**20:.1f} MiB, {len(manifest.chunk_sha256)} chunks"
    )
    print(f"targets v{repo.targets.signed.version}, snapshot v{repo.snapshot.signed.version}")
    return 0


def cmd_model_quantize(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from registry.publish import quantize_and_add

    repo = open_repo(args)
    source = Path(args.file)
    out_dir = Path(args.out) if args.out else repo.path / "build"
    results = quantize_and_add(
        repo,
        source,
        args.to,
        model_id=args.id,
        out_dir=out_dir,
        allow_requantize=args.allow_requantize,
        threads=args.threads,
        chat_template=_text_arg(args.chat_template),
    )
    table = Table(
        "variant",
        "model id",
        "size",
        "reduction",
        "time",
        title=f"{source.name} ({source.stat().st_size / 2**20:.1f} MiB)",
    )
    for variant, manifest in results:
        table.add_row(
            variant.target,
            manifest.id,
            f"{variant.size / 2**20:.1f} MiB",
            f"{variant.reduction * 100:.1f}%",
            f"{variant.seconds:.1f} s",
        )
    Console().print(table)
    return 0


def cmd_model_list(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    rows: list[dict[str, Any]] = [
        {"path": t.path, "length": t.length, "sha256": t.sha256, "kind": t.custom.get("kind")}
        for t in repo.published()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['kind']:<11} {r['length'] / 2**20:>9.1f} MiB  {r['path']}")
    return 0


def cmd_policy_add(args: argparse.Namespace) -> int:
    from registry.publish import add_policy

    path = add_policy(open_repo(args), Path(args.file), args.name, tuple(args.group))
    scope = f" for group(s) {', '.join(args.group)}" if args.group else " (no group applies it yet: --group)"
    print(f"published {path}{scope}")
    return 0


def push_deployment(args: argparse.Namespace, command: str) -> tuple[Repository, Deployment] | None:
    """Sign ``args.group``'s deployment with ``args.model`` (``deploy`` and ``deployment set``):
    under the repository lock (not while ``edge-hub serve`` re-signs the timestamp or the rollout
    controller signs a wave), after the fit check and the rollout guard: the repository and the
    signed deployment, or None when either refused (they said why)."""
    from hub.fit.check import check_push
    from hub.rollout.guard import refuse_during_rollout
    from hub.sync.meta import repo_lock
    from registry.publish import set_deployment

    with repo_lock(_repo_dir(args)):
        repo = open_repo(args)
        if check_push(args, repo, args.group, args.model, args.model_version):
            return None
        if refuse_during_rollout(args, args.group, args.model, command):
            return None
        dep = set_deployment(
            repo,
            args.group,
            args.model,
            version=args.model_version,
            pin=args.pin,
            maintenance_window=args.window,
            mirrors=tuple(args.mirror) if args.mirror is not None else None,
        )
    return repo, dep


def cmd_deployment_set(args: argparse.Namespace) -> int:
    pushed = push_deployment(args, "edge-hub deployment set")
    if pushed is None:
        return 1
    _, dep = pushed
    print(dep.to_json().decode())
    return 0


def cmd_root_rotate(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    new = repo.rotate_root(keys=args.keys, threshold=args.threshold)
    print(
        f"root v{repo.root.signed.version}: {len(new)} new keys, "
        f"threshold {repo.root.signed.roles['root'].threshold}"
    )
    print("export a bundle so devices walk the rotation (every root version is included)")
    return 0


def cmd_key_revoke(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    new = repo.revoke_key(args.role, args.keyid)
    print(f"{args.role}: key replaced by {new[:16]}...; root v{repo.root.signed.version}")
    return 0


def cmd_timestamp_refresh(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    repo.refresh_timestamp()
    ts = repo.timestamp.signed
    print(f"timestamp v{ts.version} expires {ts.expires.isoformat()}")
    return 0


def cmd_bundle_export(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    dest = repo.export_bundle(Path(args.dest))
    print(
        f"bundle written to {dest} (targets v{repo.targets.signed.version}, {len(repo.published())} targets)"
    )
    return 0


def register(sub: Any) -> None:
    def repo_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--repo", default=None, help="repository directory ($EDGE_HUB_REPO, else ./hub-repo)")
        p.add_argument(
            "--passphrase-env", default=None, help="environment variable holding the key passphrase"
        )

    repo_p = sub.add_parser("repo", help="create a signed repository").add_subparsers(
        dest="repo_cmd", required=True
    )
    p = repo_p.add_parser("init", help="create keys and initial signed metadata")
    p.add_argument("dir")
    p.add_argument("--root-threshold", type=int, default=1)
    p.add_argument("--root-keys", type=int, default=1)
    p.add_argument("--passphrase-env", default=None, help="encrypt keys with the passphrase in this variable")
    p.set_defaults(func=cmd_repo_init)

    model_p = sub.add_parser("model", help="publish models").add_subparsers(dest="model_cmd", required=True)
    p = model_p.add_parser("add", help="publish a GGUF or ONNX model file with its manifest")
    p.add_argument("file")
    p.add_argument("--id", required=True)
    p.add_argument("--model-version", default="1", help="version of this model (default 1)")
    p.add_argument("--task", choices=["completion", "chat", "embedding"], default=None)
    p.add_argument("--chat-template", default=None, help="Jinja template, or @FILE")
    p.add_argument("--licence", default=None)
    p.add_argument("--family", default=None)
    p.add_argument("--min-cpu-features", default=None, help="comma-separated, e.g. avx2,fma")
    p.add_argument("--companion", action="append", help="further file of the model (e.g. tokenizer.json)")
    p.add_argument("--companion-purpose", default="tokenizer")
    p.add_argument("--json", action="store_true")
    repo_opts(p)
    p.set_defaults(func=cmd_model_add)

    p = model_p.add_parser("quantize", help="make quantized variants and publish each")
    p.add_argument("file")
    p.add_argument("--to", required=True, help="e.g. q4_0,q5_1,q8_0,f16 (GGUF) or int8 (ONNX)")
    p.add_argument("--id", required=True, help="variants are published as <id>-<variant>")
    p.add_argument("--allow-requantize", action="store_true")
    p.add_argument("--out", default=None, help="where variant files are written (default <repo>/build)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--chat-template", default=None)
    repo_opts(p)
    p.set_defaults(func=cmd_model_quantize)

    p = model_p.add_parser("list", help="list published targets")
    p.add_argument("--json", action="store_true")
    repo_opts(p)
    p.set_defaults(func=cmd_model_list)

    policy_p = sub.add_parser("policy", help="publish policies").add_subparsers(
        dest="policy_cmd", required=True
    )
    p = policy_p.add_parser("add", help="publish a policy JSON document")
    p.add_argument("file")
    p.add_argument("--name", default=None, help="default: the file name without .json")
    p.add_argument("--group", action="append", default=[], help="a group whose devices apply it (repeatable)")
    repo_opts(p)
    p.set_defaults(func=cmd_policy_add)

    dep_p = sub.add_parser("deployment", help="desired state of groups").add_subparsers(
        dest="dep_cmd", required=True
    )
    p = dep_p.add_parser("set", help="make a group hold a model")
    p.add_argument("--group", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--model-version", default=None)
    p.add_argument("--pin", action="store_true", help="serve this model as the group's default")
    p.add_argument("--window", default=None, help="maintenance window HH:MM-HH:MM (UTC)")
    p.add_argument(
        "--force",
        action="store_true",
        help="push even to boxes the model does not fit, and end a rollout of the model in the group",
    )
    p.add_argument(
        "--db", default=None, help="hub database for the fit and rollout checks ($EDGE_HUB_DB, else ./hub.db)"
    )
    p.add_argument(
        "--mirror",
        action="append",
        default=None,
        help="HTTP(S) mirror of the repo targets/ for the group (repeatable; replaces the list)",
    )
    repo_opts(p)
    p.set_defaults(func=cmd_deployment_set)

    root_p = sub.add_parser("root", help="root keys").add_subparsers(dest="root_cmd", required=True)
    p = root_p.add_parser("rotate", help="replace all root keys (new root signed by old and new keys)")
    p.add_argument("--keys", type=int, default=None)
    p.add_argument("--threshold", type=int, default=None)
    repo_opts(p)
    p.set_defaults(func=cmd_root_rotate)

    key_p = sub.add_parser("key", help="role keys").add_subparsers(dest="key_cmd", required=True)
    p = key_p.add_parser("revoke", help="replace a role's key by a new one")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--keyid", default=None, help="key id (prefix) when the role has several keys")
    repo_opts(p)
    p.set_defaults(func=cmd_key_revoke)

    ts_p = sub.add_parser("timestamp", help="timestamp role").add_subparsers(dest="ts_cmd", required=True)
    p = ts_p.add_parser("refresh", help="re-sign the timestamp (run on a schedule)")
    repo_opts(p)
    p.set_defaults(func=cmd_timestamp_refresh)

    bundle_p = sub.add_parser("bundle", help="air-gapped transfer").add_subparsers(
        dest="bundle_cmd", required=True
    )
    p = bundle_p.add_parser("export", help="write metadata and blobs to DIR or FILE.tar")
    p.add_argument("dest")
    repo_opts(p)
    p.set_defaults(func=cmd_bundle_export)


__all__ = ["open_repo", "register"]
