"""Policy documents: parsing errors, config loading, hub policies whose version never goes back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from agent.access import Action, Subject, decide
from agent.audit.store import AuditLog, audit_path
from agent.config import Settings
from agent.errors import ConfigError
from agent.policy import (
    HUB_POLICY_FILE,
    PolicyError,
    PolicyHolder,
    accept_policy,
    effective_policy,
    load_hub_policy,
    local_policy,
    parse_policy,
    parse_policy_bytes,
    policy_dir,
    policy_to_dict,
)

GOOD: dict[str, Any] = {
    "roles": {"app": {"permissions": [{"actions": ["infer"], "models": ["gemma-*"]}]}},
    "bindings": [{"role": "app", "groups": ["apps"]}],
}


def doc(**changes: Any) -> dict[str, Any]:
    return {**json.loads(json.dumps(GOOD)), **changes}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param([], "expected a JSON object", id="not-an-object"),
        pytest.param({"bindings": []}, "roles: required key is missing", id="no-roles"),
        pytest.param(doc(extra=1), "extra: unknown key", id="unknown-top-level-key"),
        pytest.param(
            doc(roles={"app": {"permissions": [{"actions": ["fly"]}]}}),
            "unknown action 'fly'",
            id="unknown-action",
        ),
        pytest.param(
            doc(roles={"app": {"permissions": [{"actions": []}]}}),
            "roles.app.permissions.0.actions",
            id="empty-actions",
        ),
        pytest.param(
            doc(roles={"app": {"permissions": [{"actions": ["infer"], "models": [""]}]}}),
            "model patterns are non-empty",
            id="empty-model-pattern",
        ),
        pytest.param(
            doc(roles={"app": {"limits": {"max_tokens": 0}}}),
            "roles.app.limits.max_tokens",
            id="non-positive-limit",
        ),
        pytest.param(
            doc(roles={"app": {"limits": {"max_tokens": "10"}}}),
            "roles.app.limits.max_tokens",
            id="limit-as-string",
        ),
        pytest.param(doc(roles={"bad name": {}}), "role name 'bad name'", id="bad-role-name"),
        pytest.param(
            doc(bindings=[{"role": "ghost", "users": ["x"]}]),
            "names role 'ghost', which is not defined",
            id="binding-to-missing-role",
        ),
        pytest.param(doc(bindings=[{"role": "app"}]), "names at least one of", id="binding-matches-nobody"),
        pytest.param(doc(bindings=[{"role": "app", "uids": ["0"]}]), "bindings.0.uids.0", id="uid-as-string"),
        pytest.param(doc(version=-1), "version", id="negative-version"),
    ],
)
def test_invalid_documents_are_refused_naming_the_key(data: Any, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy(data)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b"\xff\xfe", "not UTF-8 JSON", id="not-utf8"),
        pytest.param(b"{", "not UTF-8 JSON", id="truncated-json"),
        pytest.param(b" " * (1 << 20) + b"{}", "larger than", id="too-large"),
    ],
)
def test_invalid_bytes_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy_bytes(raw)


def test_document_round_trips() -> None:
    policy = parse_policy(
        doc(
            version=3,
            roles={
                "app": {
                    "permissions": [{"actions": ["infer", "status"], "models": ["a*", "b"]}],
                    "limits": {"max_tokens": 5, "requests_per_minute": 7},
                }
            },
            bindings=[{"role": "app", "users": ["u"], "groups": ["g"], "uids": [3], "key_ids": ["k"]}],
        )
    )
    again = parse_policy(policy_to_dict(policy))
    assert again.roles == policy.roles and again.bindings == policy.bindings and again.version == 3


def test_inline_config_policy(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {"state_dir": tmp_path, "access": {"roles": GOOD["roles"], "bindings": GOOD["bindings"]}}
    )
    policy = local_policy(settings)
    assert decide(Subject(uid=5, user="x", groups=("apps",)), Action.INFER, "gemma-2", policy).allowed
    assert not decide(Subject(uid=0, user="root", groups=("root",)), Action.STATUS, None, policy).allowed


def test_bad_inline_policy_is_a_config_error(tmp_path: Path) -> None:
    from agent.config import load_settings

    config = tmp_path / "config.toml"
    config.write_text('[access.roles.app]\npermissions = [{ actions = ["fly"] }]\n')
    with pytest.raises(ConfigError, match="unknown action 'fly'") as err:
        load_settings(config)
    assert "\n" not in str(err.value)


def test_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc(version=0)))
    policy = local_policy(Settings.model_validate({"state_dir": tmp_path, "access": {"policy_file": path}}))
    assert policy.source == str(path)
    path.write_text("{broken")
    with pytest.raises(PolicyError, match="not UTF-8 JSON"):
        local_policy(Settings.model_validate({"state_dir": tmp_path, "access": {"policy_file": path}}))


def test_default_policy_binds_root_daemon_user_and_socket_group(tmp_path: Path) -> None:
    policy = local_policy(
        Settings.model_validate({"state_dir": tmp_path, "server": {"socket_group": "edge-clients"}})
    )
    assert policy.source == "built-in default"
    client = Subject(uid=3000, user="c", groups=("edge-clients",))
    assert decide(client, Action.INFER, "m", policy).allowed
    assert not decide(client, Action.AUDIT_READ, None, policy).allowed
    me = Subject(uid=os.geteuid(), user="whoever", groups=())
    assert decide(me, Action.ADMIN, None, policy).allowed


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str | None, str, str]] = []

    def record(
        self,
        action: str,
        resource: str | None,
        outcome: str,
        reason: str,
        details: dict[str, Any] | None = None,
    ) -> int:
        self.events.append((action, resource, outcome, reason))
        return len(self.events)


def hub_doc(version: int, model: str = "gemma-*") -> bytes:
    data = doc(version=version)
    data["roles"]["app"]["permissions"][0]["models"] = [model]
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("document", "version", "message"),
    [
        pytest.param(hub_doc(2), 2, "not newer than the current version 2", id="same-version-other-bytes"),
        pytest.param(hub_doc(1), 1, "not newer than the current version 2", id="older-version"),
        pytest.param(b"{not json", 3, "not UTF-8 JSON", id="invalid-json"),
        pytest.param(
            json.dumps({"roles": {"a": {"permissions": [{"actions": ["x"]}]}}}).encode(),
            3,
            "unknown action",
            id="invalid-document",
        ),
        pytest.param(hub_doc(4), 3, "document says version 4", id="version-mismatch"),
        pytest.param(hub_doc(0), 0, "positive integer", id="version-zero"),
    ],
)
def test_refused_hub_policies_leave_the_current_one(
    tmp_path: Path, document: bytes, version: int, message: str
) -> None:
    recorder = Recorder()
    accept_policy(tmp_path, hub_doc(2, model="llama-*"), 2, audit=recorder)
    before = (policy_dir(tmp_path) / HUB_POLICY_FILE).read_bytes()
    with pytest.raises(PolicyError, match=message):
        accept_policy(tmp_path, document, version, audit=recorder)
    assert (policy_dir(tmp_path) / HUB_POLICY_FILE).read_bytes() == before
    stored = load_hub_policy(tmp_path)
    assert stored is not None and stored.policy.version == 2
    assert recorder.events[0][2] == "ok"
    assert recorder.events[-1][:3] == ("policy.change", f"hub v{version}", "refused")


def test_newer_hub_policy_replaces_local_and_redelivery_is_a_no_op(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path)
    assert effective_policy(settings).source == "built-in default"
    log = AuditLog(audit_path(tmp_path))
    accept_policy(tmp_path, hub_doc(1), 1, audit=log)
    assert accept_policy(tmp_path, hub_doc(1), 1, audit=log).version == 1  # same bytes again
    policy = accept_policy(tmp_path, hub_doc(5, "phi-*"), 5, audit=log)
    assert policy.version == 5
    assert effective_policy(settings).version == 5
    app = Subject(uid=9, user="x", groups=("apps",))
    assert decide(app, Action.INFER, "phi-2", effective_policy(settings)).allowed
    assert not decide(app, Action.INFER, "gemma-3", effective_policy(settings)).allowed
    actions = [(s.record()["action"], s.record()["outcome"]) for s in log.tail(10)]
    assert actions == [("policy.change", "ok"), ("policy.change", "ok")]
    assert (policy_dir(tmp_path) / HUB_POLICY_FILE).stat().st_mode & 0o777 == 0o600


def test_tampered_stored_policy_is_not_loaded(tmp_path: Path) -> None:
    accept_policy(tmp_path, hub_doc(1), 1)
    path = policy_dir(tmp_path) / HUB_POLICY_FILE
    envelope = json.loads(path.read_text())
    envelope["document"] = envelope["document"].replace("gemma-*", "*")
    path.write_text(json.dumps(envelope))
    with pytest.raises(PolicyError, match="does not match its sha256"):
        load_hub_policy(tmp_path)


def test_holder_picks_up_accepted_policy_and_keeps_current_on_damage(tmp_path: Path) -> None:
    now = [0.0]
    local = local_policy(Settings(state_dir=tmp_path))
    holder = PolicyHolder(local, tmp_path, clock=lambda: now[0], recheck_s=1.0)
    changes: list[tuple[str, str]] = []
    holder.on_change = lambda old, new: changes.append((old.source, new.source))
    assert holder.current() is local
    accept_policy(tmp_path, hub_doc(3), 3)
    assert holder.current() is local  # not re-checked yet
    now[0] += 1.0
    assert holder.current().version == 3
    (policy_dir(tmp_path) / HUB_POLICY_FILE).write_text("garbage")
    now[0] += 1.0
    assert holder.current().version == 3  # damaged file: the policy in force stays
    assert changes == [("built-in default", "hub v3")]


def test_holder_keeps_the_policy_when_the_policy_directory_cannot_be_read(tmp_path: Path) -> None:
    local = local_policy(Settings(state_dir=tmp_path))
    policy_dir(tmp_path).write_text("a file where the directory should be")
    holder = PolicyHolder(local, tmp_path, recheck_s=0.0)
    assert holder.current() is local
    assert holder.current() is local


def test_daemon_refuses_to_start_with_a_bad_policy_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "policy.json"
    bad.write_text(json.dumps({"roles": {"a": {}}, "bindings": [{"role": "ghost", "users": ["x"]}]}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    env.update(EDGE_AGENT_STATE_DIR=str(tmp_path / "state"), EDGE_AGENT_ACCESS__POLICY_FILE=str(bad))
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "names role 'ghost', which is not defined" in proc.stderr


RACE = """
import json, sys
from pathlib import Path
from agent.policy import PolicyError, accept_policy
version = int(sys.argv[2])
doc = {"version": version, "roles": {"app": {"permissions": [{"actions": ["status"]}]}},
       "bindings": [{"role": "app", "groups": ["apps"]}]}
try:
    accept_policy(Path(sys.argv[1]), json.dumps(doc).encode(), version)
except PolicyError:
    pass
"""


def test_racing_importers_never_move_the_version_backwards(tmp_path: Path) -> None:
    import subprocess
    import sys

    procs = [
        subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), str(v)])
        for v in (3, 8, 1, 6, 2, 7, 5, 4)
    ]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    stored = load_hub_policy(tmp_path)
    assert stored is not None and stored.policy.version == 8
