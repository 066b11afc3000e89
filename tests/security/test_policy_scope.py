"""Policies are scoped to groups by the signed deployment (issue 15, medium #6).

Before: every device installed every ``policies/*.json`` and the highest version of any of them
won, so a lab policy at version 9 replaced production's version 3 on every box. Now a deployment
names its group's policy (``policy``, signed with it) and a device installs only the policies its
own groups' deployments name; groups naming different policies apply none.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from agent.policy import accept_policy, load_hub_policy
from registry.exceptions import Reason, Refused
from registry.metadata import Deployment
from registry.publish import add_policy
from tests.registry.fleet import Fleet
from tests.sync.helpers import offline_service


def policy_file(directory: Path, name: str, version: int) -> Path:
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"version": version, "roles": {}, "bindings": []}))
    return path


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    f = Fleet(tmp_path)
    add_policy(f.repo, policy_file(f.files, "lab", 9), "lab", ("lab",))
    add_policy(f.repo, policy_file(f.files, "prod", 3), "prod", ("shop",))
    add_policy(f.repo, policy_file(f.files, "orphan", 50), "orphan")  # signed, named by no group
    return f


CASES = [
    pytest.param(("shop",), ["policies/prod.json"], id="shop-box-gets-prod-only-not-lab-v9"),
    pytest.param(("lab",), ["policies/lab.json"], id="lab-box-gets-lab-only"),
    pytest.param(("eu",), [], id="group-without-deployment-gets-none"),
    pytest.param(("lab", "shop"), ["policies/lab.json", "policies/prod.json"], id="two-groups-install-both"),
]


@pytest.mark.parametrize(("groups", "policies"), CASES)
def test_a_box_installs_only_the_policies_its_groups_name(
    fleet: Fleet, groups: tuple[str, ...], policies: list[str]
) -> None:
    box = fleet.box(groups=groups)
    box.import_bundle(fleet.bundle())
    installed = sorted(t.path for t in box.registry.index().of_kind("policy"))
    assert installed == policies  # never policies/orphan.json (version 50)


def test_a_deployment_naming_an_unsigned_policy_is_refused(fleet: Fleet) -> None:
    fleet.repo.add_bytes(
        "deployments/lab.json", Deployment("lab", policy="nowhere").to_json(), {"kind": "deployment"}
    )
    fleet.repo.publish()
    with pytest.raises(Refused) as info:
        fleet.box().import_bundle(fleet.bundle())
    assert info.value.reason is Reason.MISSING


@pytest.mark.parametrize(
    ("groups", "applied", "refused"),
    [
        pytest.param(("shop",), 3, [], id="one-policy-applied"),
        pytest.param(
            ("lab", "shop"), None, ["policies/lab.json", "policies/prod.json"], id="conflict-applies-none"
        ),
    ],
)
def test_the_sync_service_applies_only_an_unambiguous_policy(
    fleet: Fleet,
    certdir: Path,
    tmp_path: Path,
    groups: tuple[str, ...],
    applied: int | None,
    refused: list[str],
) -> None:
    box = fleet.box(groups=groups)
    box.import_bundle(fleet.bundle())
    sync = offline_service(box.state_dir, certdir)
    sync.policy_sink = lambda doc, version: (accept_policy(box.state_dir, doc, version), None)[1]
    try:
        asyncio.run(sync._apply_policies())
        stored = load_hub_policy(box.state_dir)
        assert (stored.policy.version if stored is not None else None) == applied
        events = sync.outbox.pending()
        assert sorted(e.target for e in events if e.status == "policy_refused") == refused
    finally:
        sync.ledger.close()
