"""`edge-agent sync status`: the setup checks an operator needs before a device can sync."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from tests.sync.helpers import enrolled_device, new_repo


def _env(monkeypatch: pytest.MonkeyPatch, certdir: Path, cn: str, **overrides: str) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("EDGE_AGENT_"):
            monkeypatch.delenv(key)
    values = {
        "HOST": "127.0.0.1",
        "CA_FILE": str(certdir / "ca.crt"),
        "CERT_FILE": str(certdir / f"{cn}.crt"),
        "KEY_FILE": str(certdir / f"{cn}.key"),
        **overrides,
    }
    for key, value in values.items():
        monkeypatch.setenv(f"EDGE_AGENT_HUB__{key}", value)


CASES = [
    pytest.param("dev-a", {}, True, 0, None, id="ready"),
    pytest.param("dev-b", {}, True, 2, "CN is 'dev-b'", id="certificate-of-another-device"),
    pytest.param("dev-a", {"CA_FILE": "/nonexistent/ca.crt"}, True, 2, "file not found", id="missing-ca"),
    pytest.param("dev-a", {}, False, 2, "not enrolled", id="not-enrolled"),
]


@pytest.mark.parametrize(("cn", "overrides", "enroll", "code", "problem"), CASES)
def test_sync_status(
    tmp_path: Path,
    certdir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cn: str,
    overrides: dict[str, str],
    enroll: bool,
    code: int,
    problem: str | None,
) -> None:
    state = tmp_path / "state"
    if enroll:
        repo = new_repo(tmp_path / "repo")
        enrolled_device(state, repo.path, "dev-a")
    _env(monkeypatch, certdir, cn, **overrides)
    assert agent_main(["--state-dir", str(state), "sync", "status", "--json"]) == code
    report = json.loads(capsys.readouterr().out)
    assert report["enabled"] is True
    if problem is None:
        assert report["problems"] == [] and report["device_id"] == "dev-a"
    else:
        assert any(problem in p for p in report["problems"]), report["problems"]
