"""Device ids that would collide with broker roles or the CA's files (issue 15, low): ``hub``,
``operator``, ``ca``, ``broker`` are refused at enrollment, on device topics at the hub, and by the
certificate tooling (tests/security/test_revocation.py); the broker refuses them as well
(tests/security/test_broker_acl.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet.errors import ProtocolError
from fleet.messages import RESERVED_DEVICE_IDS, check_device_id, device_of
from registry.device import RESERVED_DEVICE_IDS as REGISTRY_RESERVED
from registry.device import DeviceRegistry
from registry.exceptions import ManifestError
from tests.sync.helpers import new_repo

RESERVED = [pytest.param(name, id=name) for name in ("hub", "operator", "ca", "broker", "HUB")]


def test_both_lists_agree() -> None:
    assert RESERVED_DEVICE_IDS == REGISTRY_RESERVED == {"hub", "operator", "ca", "broker"}


@pytest.mark.parametrize("name", RESERVED)
def test_enrollment_refuses_a_reserved_device_id(tmp_path: Path, name: str) -> None:
    repo = new_repo(tmp_path / "repo")
    root = (repo.path / "metadata" / "root.json").read_bytes()
    with pytest.raises(ManifestError, match="reserved"):
        DeviceRegistry(tmp_path / "state").enroll(root, name, ("edge",))


@pytest.mark.parametrize("name", RESERVED[:4])
def test_the_hub_refuses_reserved_ids_on_device_topics(name: str) -> None:
    with pytest.raises(ProtocolError):
        device_of(f"edge/v1/devices/{name}/state")
    with pytest.raises(ProtocolError):
        check_device_id(name)
