"""``edge-hub rollout start | pause | resume | abort | status``.

The commands write requests into the hub database; the controller inside ``edge-hub serve``
signs (hub/rollout/controller.py). ``start`` checks what it can before storing anything: the
group's boxes known to the hub, the new version published, the version the group holds now (the
rollback target) and the waves; a refusal exits 2 naming the problem.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hub.rollout.criteria import DEFAULT_CRITERIA, box_order, measured, parse_waves
from hub.rollout.store import ACTIVE, Rollout, RolloutStore

_CRITERIA_FLAGS = {
    "max_slowdown": "pause when tokens/s is more than this fraction below the previous version",
    "max_ttft_increase": "pause when p95 time to first token is more than this fraction above it",
    "max_error_rate": "abort and roll back above this error rate (5xx / requests) on the new version",
    "min_requests": "requests on the new version before the error rate counts",
    "min_samples": "tokens/s samples (both versions) before speed is compared; also what a wave needs",
    "soak_s": "a wave without min_samples passes after this many seconds",
    "wave_timeout_s": "a box offline this long after its wave started is skipped",
}


def _fail(message: str) -> int:
    print(f"edge-hub rollout: {message}", file=sys.stderr)
    return 2


def _store(args: argparse.Namespace) -> RolloutStore:
    from hub.sync.db import db_target, exists
    from hub.sync.store import HubStore

    db = db_target(args.db)
    if not exists(db):
        raise SystemExit(_fail(f"no hub database at {db} (run `edge-hub serve` first)"))
    return RolloutStore(HubStore(db))


def _previous_version(repo: Any, group: str, model: str, version: str) -> str:
    """The version the group holds now (the rollback target); ValueError when there is none."""
    from registry.publish import current_deployment

    published = sorted(
        {t.path.split("/")[2] for t in repo.published() if t.path.startswith(f"models/{model}/")}
    )
    if version not in published:
        raise ValueError(f"model {model!r} has no published version {version!r}")
    dep = current_deployment(repo, group)
    entry = next((m for m in dep.models if m.model == model), None)
    if entry is None:
        raise ValueError(
            f"group {group} holds no {model} yet: a rollout moves boxes from one version to another "
            f"(edge-hub deploy --group {group} --model {model} --model-version V first)"
        )
    if dep.waves and any(w.model == model for w in dep.waves):
        raise ValueError(f"group {group}'s deployment already carries waves for {model}")
    if entry.version is not None:
        previous = entry.version
    else:  # "newest": the newest published before the new one is what the boxes run
        from registry.device import _version_key

        older = [v for v in published if _version_key(v) < _version_key(version)]
        if not older:
            raise ValueError(f"no {model} version older than {version} is published")
        previous = max(older, key=_version_key)
    if previous == version:
        raise ValueError(f"group {group} already holds {model} {version}")
    return previous


def cmd_start(args: argparse.Namespace) -> int:
    from hub.repo.commands import open_repo
    from hub.sync.meta import repo_lock

    store = _store(args)
    group_boxes = sorted(
        r.device for r in store.store.devices() if r.state is not None and args.group in r.state.groups
    )
    if not group_boxes:
        return _fail(f"the hub knows no box of group {args.group} (boxes report their groups in their state)")
    try:
        waves = parse_waves(args.waves, len(group_boxes))
        with repo_lock(Path(args.repo) if args.repo else Path(os.environ.get("EDGE_HUB_REPO", "hub-repo"))):
            repo = open_repo(args)
        version = args.model_version or _newest(repo, args.model)
        previous = _previous_version(repo, args.group, args.model, version)
    except ValueError as exc:
        return _fail(str(exc))
    from hub.fit.check import refuse_unfit  # the same check as deploy

    if refuse_unfit(repo, store.store, group_boxes, args.model, version, force=args.force):
        return 1
    criteria = {k: float(getattr(args, k)) for k in DEFAULT_CRITERIA}
    order = box_order(group_boxes, f"{args.group}/{args.model}/{version}")
    try:
        rollout = store.create(args.group, args.model, version, previous, waves, criteria, order)
    except ValueError as exc:
        return _fail(str(exc))
    store.log(rollout, "created", f"waves {waves} of {len(order)} boxes; criteria {json.dumps(criteria)}")
    print(
        f"rollout {rollout.id}: {args.group} {args.model} {previous} -> {version} in {len(waves)} waves "
        f"({', '.join(str(n) for n in waves)} boxes); edge-hub serve signs wave 1"
    )
    return 0


def _newest(repo: Any, model: str) -> str:
    from registry.device import _version_key

    versions = {t.path.split("/")[2] for t in repo.published() if t.path.startswith(f"models/{model}/")}
    if not versions:
        raise ValueError(f"model {model!r} is not published")
    return str(max(versions, key=_version_key))


def _pick(store: RolloutStore, args: argparse.Namespace) -> Rollout | None:
    if args.id is not None:
        return store.get(args.id)
    return store.latest(args.group)


def _transition(
    args: argparse.Namespace,
    allowed: tuple[str, ...],
    decision: str,
    change: Callable[[Rollout], dict[str, Any]],
) -> int:
    store = _store(args)
    rollout = _pick(store, args)
    if rollout is None:
        return _fail("no such rollout")
    if rollout.state not in allowed:
        return _fail(f"rollout {rollout.id} is {rollout.state}: cannot {decision.removesuffix('d')}")
    store.update(rollout.id, **change(rollout))
    store.log(rollout, decision, f"by the operator{': ' + args.reason if args.reason else ''}")
    print(f"rollout {rollout.id}: {decision}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    return _transition(
        args, ("running", "starting"), "paused", lambda r: {"state": "paused", "reason": "operator"}
    )


def cmd_resume(args: argparse.Namespace) -> int:
    # The operator accepts the current wave's measured speed: it no longer pauses this wave.
    return _transition(
        args, ("paused",), "resumed", lambda r: {"state": "running", "reason": "", "waived_wave": r.wave}
    )


def cmd_abort(args: argparse.Namespace) -> int:
    return _transition(
        args,
        ("starting", "running", "paused"),
        "aborted",
        lambda r: {"state": "aborting", "reason": "operator"},
    )


def status_of(store: RolloutStore, rollout: Rollout) -> dict[str, Any]:
    """The live view: per wave its boxes and their status, what was measured, the history."""
    from hub.rollout.controller import boxes_of, inventory

    boxes = boxes_of(rollout, inventory(store.store))
    waves = []
    for i, count in enumerate(rollout.waves):
        mine = [b for b in boxes if b.wave == i]
        counts = {s: sum(b.status == s for b in mine) for s in ("moved", "failed", "pending", "offline")}
        waves.append(
            {
                "wave": i + 1,
                "boxes": count,
                **counts,
                "healthy": sum(b.status == "moved" and b.health.get("activation") == "passed" for b in mine),
                "devices": [
                    {
                        "device": b.device,
                        "status": b.status,
                        "online": b.online,
                        "detail": b.detail,
                        **b.health,
                    }
                    for b in mine
                ],
                "measured": measured(mine),
            }
        )
    return {
        **rollout.to_json_dict(),
        "measured": measured([b for b in boxes if b.wave <= rollout.wave]),
        "wave_list": waves,
        "history": [{"at": at, "decision": d, "detail": t} for at, d, t in store.history(rollout.id)],
    }


def cmd_status(args: argparse.Namespace) -> int:
    store = _store(args)
    rollout = _pick(store, args)
    if rollout is None:
        return _fail("no such rollout")
    view = status_of(store, rollout)
    if args.json:
        print(json.dumps(view, indent=2, sort_keys=True))
        return 0
    r = rollout
    print(f"rollout {r.id}: {r.group} {r.model} {r.previous} -> {r.version}: {r.state}"
          f"{' (' + r.reason + ')' if r.reason else ''}, wave {r.wave + 1} of {len(r.waves)}")  # fmt: skip
    print("criteria: " + ", ".join(f"{k}={v:g}" for k, v in r.criteria.items()))
    print(f"baseline ({r.previous}): {json.dumps(r.baseline, sort_keys=True)}")
    print(f"measured ({r.version}): {json.dumps(view['measured'], sort_keys=True)}")
    for w in view["wave_list"]:
        print(
            f"wave {w['wave']}: {len(w['devices'])} boxes, moved {w['moved']}, healthy {w['healthy']}, "
            f"failed {w['failed']}, pending {w['pending']}, offline {w['offline']}"
        )
        for d in w["devices"]:
            print(
                f"  {d['device']:<24} {d['status']:<9} tok/s {d.get('tokens_per_s')} "
                f"p95 ttft {d.get('ttft_p95_s')} req {d.get('requests', 0)} err {d.get('errors', 0)} "
                f"{d['detail']}"
            )
    for h in view["history"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h["at"]))
        print(f"{when} {h['decision']}: {h['detail']}")
    return 0


def register(
    sub: Any, repo_opts: Callable[[argparse.ArgumentParser], None], db_opt: Callable[..., None]
) -> None:
    rollout = sub.add_parser("rollout", help="staged rollouts gated on model health").add_subparsers(
        dest="rollout_cmd", required=True
    )
    p = rollout.add_parser("start", help="move a group to a model version wave by wave")
    p.add_argument("--group", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--version", dest="model_version", default=None, help="default: the newest published")
    p.add_argument(
        "--waves", default="1%,10%,50%,100%", help="cumulative N%% or counts, 'all' (default %(default)s)"
    )
    p.add_argument("--force", action="store_true", help="start even where the model does not fit a box")
    for key, text in _CRITERIA_FLAGS.items():
        p.add_argument(f"--{key.replace('_', '-')}", dest=key, type=float, default=DEFAULT_CRITERIA[key],
                       help=f"{text} (default %(default)s)")  # fmt: skip
    repo_opts(p)
    db_opt(p)
    p.set_defaults(func=cmd_start)
    for name, func, text in (
        ("pause", cmd_pause, "stop adding boxes (moved boxes stay)"),
        ("resume", cmd_resume, "continue; the current wave's speed checks are accepted"),
        ("abort", cmd_abort, "stop and roll the moved boxes back to the previous version"),
        ("status", cmd_status, "the live view"),
    ):
        p = rollout.add_parser(name, help=text)
        p.add_argument("--id", type=int, default=None)
        p.add_argument(
            "--group", default=None, help="the group's latest rollout (default: the latest of all)"
        )
        if name == "status":
            p.add_argument("--json", action="store_true")
        else:
            p.add_argument("--reason", default="")
        db_opt(p)
        p.set_defaults(func=func)


__all__ = ["ACTIVE", "register", "status_of"]
