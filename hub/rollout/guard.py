"""An operator's push of a model while a staged rollout of that model runs in the group.

``edge-hub deploy`` / ``edge-hub deployment set`` sign the group's deployment anew, without waves:
done silently during a rollout, that would drop the rollout's signed wave selector under the
controller's feet. So the push is refused, naming the rollout, unless ``--force``: then the
rollout ends in state ``aborted`` (terminal, nothing rolled back: the operator's deployment is what
the group holds now), with the decision in the rollout's log and the hub's audit trail.

Invariant: the check and the state change happen while the caller holds the repository lock
(hub.sync.meta.repo_lock), and the controller re-checks that its rollout is still active under the
same lock before it signs (hub/rollout/controller.py), so a wave is never signed over the push.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from hub.rollout.store import ACTIVE, Rollout, RolloutStore

ABORTED = "aborted"
"""Terminal: stopped without a rollback (an operator's forced push replaced the deployment)."""


def in_progress(store: RolloutStore, group: str, model: str) -> Rollout | None:
    """The active rollout of ``model`` in ``group``, if any."""
    return next((r for r in store.active() if r.group == group and r.model == model), None)


def refuse_during_rollout(args: Any, group: str, model: str, command: str) -> bool:
    """True (refuse, message printed) when a rollout of ``model`` in ``group`` is active and not
    ``args.force``; with ``--force`` that rollout is ended (:data:`ABORTED`) and False returned.
    No hub database (``--db``, ``$EDGE_HUB_DB``, ``./hub.db``): no rollout can run, False."""
    from hub.sync.store import HubStore

    db = Path(args.db) if getattr(args, "db", None) else Path(os.environ.get("EDGE_HUB_DB", "hub.db"))
    if not db.is_file():
        return False
    hub = HubStore(db)
    try:
        store = RolloutStore(hub)
        r = in_progress(store, group, model)
        if r is None:
            return False
        what = f"rollout {r.id} of {model} in {group} ({r.previous} -> {r.version}, {r.state}, "
        what += f"wave {r.wave + 1})"
        if not args.force:
            print(
                f"edge-hub: {what} is in progress: `{command}` would drop its waves. "
                f"Finish or abort it first (edge-hub rollout abort --id {r.id}), or --force to end it "
                "and push anyway",
                file=sys.stderr,
            )
            return True
        store.transition(
            r,
            ABORTED,
            f"by the operator: `{command} --force` replaced the deployment; nothing rolled back",
            state=ABORTED,
            reason=f"replaced by `{command} --force`",
        )
        print(f"edge-hub: {what} ended ({ABORTED}): `{command} --force`", file=sys.stderr)
        return False
    finally:
        hub.close()


def still_active(store: RolloutStore, rid: int) -> bool:
    r = store.get(rid)
    return r is not None and r.state in ACTIVE


__all__ = ["ABORTED", "in_progress", "refuse_during_rollout", "still_active"]
