"""`edge-agent audit tail|export` and `edge-agent policy show|check` through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.audit.store import AuditLog, audit_path
from agent.cli import main
from agent.policy import accept_policy
from fleet.device_key import ensure_device_key


@pytest.fixture
def state(tmp_path: Path) -> Path:
    log = AuditLog(audit_path(tmp_path), key=ensure_device_key(tmp_path), checkpoint_every=4)
    for i in range(6):
        log.record("infer", "gemma", "ok" if i % 2 else "denied", f"reason {i}", {"status": 200, "i": i})
    log.close()
    return tmp_path


def test_tail(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--state-dir", str(state), "audit", "tail", "-n", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "reason 4" in lines[0] and "reason 5" in lines[1] and "status=200" in lines[1]
    assert main(["--state-dir", str(state), "audit", "tail", "-n", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seq"] == 6


def test_export_round_trips_through_the_hub_side_check(state: Path, tmp_path: Path) -> None:
    from fleet.chain import Checkpoint, Sealed, verify

    out = tmp_path / "export.jsonl"
    assert main(["--state-dir", str(state), "audit", "export", "-o", str(out)]) == 0
    items = [json.loads(line) for line in out.read_text().splitlines()]
    anchor = next(i for i in items if i["type"] == "anchor")
    rows = [Sealed(i["seq"], i["body"], i["hash"]) for i in items if i["type"] == "record"]
    cps = [Checkpoint(i["seq"], i["body"], i["signature"]) for i in items if i["type"] == "checkpoint"]
    report = verify(rows, cps, [ensure_device_key(state).public], (anchor["seq"], anchor["hash"]))
    assert report.ok and report.records == 6 and [c.seq for c in cps] == [4, 6]


def test_missing_log_is_a_runtime_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--state-dir", str(tmp_path / "none"), "audit", "verify"]) == 1
    assert "no audit log at" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "code", "expected"),
    [
        pytest.param(
            ["root", "infer", "gemma"], 0, "ALLOW: infer on model 'gemma' granted by role admin", id="root"
        ),
        pytest.param(["0", "audit.read"], 0, "ALLOW: audit.read granted", id="uid-0"),
        pytest.param(
            ["nobody", "infer", "gemma"], 1, "DENY: permission \"infer on model 'gemma'\"", id="nobody"
        ),
        pytest.param(
            ["no-such-user-xyz", "status"], 1, "no role is bound to user no-such-user-xyz", id="unknown"
        ),
        pytest.param(["root", "fly"], 2, "unknown action 'fly'", id="bad-action"),
    ],
)
def test_policy_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, expected: str
) -> None:
    assert main(["--state-dir", str(tmp_path), "policy", "check", *argv]) == code
    captured = capsys.readouterr()
    assert expected in captured.out + captured.err


def test_policy_show_prefers_the_accepted_hub_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--state-dir", str(tmp_path), "policy", "show"]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "built-in default"
    document = {
        "version": 7,
        "roles": {"ops": {"permissions": [{"actions": ["status"]}], "limits": {"requests_per_minute": 5}}},
        "bindings": [{"role": "ops", "users": ["nobody"]}],
    }
    accept_policy(tmp_path, json.dumps(document).encode(), 7)
    capsys.readouterr()  # its log line
    assert main(["--state-dir", str(tmp_path), "policy", "show"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["source"] == "hub v7" and shown["version"] == 7
    assert shown["roles"]["ops"]["limits"] == {"requests_per_minute": 5}
    assert main(["--state-dir", str(tmp_path), "policy", "check", "nobody", "status"]) == 0
    assert "limits: max_tokens=None requests_per_minute=5" in capsys.readouterr().out
    assert main(["--state-dir", str(tmp_path), "policy", "check", "root", "status"]) == 1


def test_export_mark_uploaded_prunes_and_the_log_still_verifies(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--state-dir", str(state), "audit", "export", "--mark-uploaded"]) == 2
    assert "needs --output" in capsys.readouterr().err
    out = tmp_path / "usb.jsonl"
    assert main(["--state-dir", str(state), "audit", "export", "-o", str(out), "--mark-uploaded"]) == 0
    assert "marked uploaded up to record 6; pruned 6 record(s)" in capsys.readouterr().err
    assert len([line for line in out.read_text().splitlines() if '"type": "record"' in line]) == 6
    log = AuditLog(audit_path(state), key=ensure_device_key(state))
    log.record("infer", "gemma", "ok", "after the export")
    assert main(["--state-dir", str(state), "audit", "verify"]) == 0
    assert "records 7..7 (1)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--mark-uploaded"], 2, "needs --output"),
        (["-o", "{tmp}/no/such/dir/export.jsonl"], 1, "cannot write"),
        (["-o", "{tmp}"], 1, "cannot write"),
    ],
    ids=["mark-uploaded-without-output", "output-dir-missing", "output-is-a-directory"],
)
def test_export_bad_output(
    state: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    code: int,
    message: str,
) -> None:
    argv = [a.format(tmp=tmp_path) for a in extra]
    assert main(["--state-dir", str(state), "audit", "export", *argv]) == code
    assert message in capsys.readouterr().err
