"""Low items of issue 15, each a named case: through the real daemon where the API is concerned."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.messages import StateReport
from hub.cli import main as hub_main
from hub.sync.commands import shown
from hub.sync.store import HubStore
from tests.daemon import Daemon, accepts, running_daemon, uds_client

OPS = {
    "version": 1,
    "roles": {
        "ops": {
            "permissions": [
                {"actions": ["models.admin", "status"], "models": ["gemma-*"]},
                {"actions": ["infer"]},
            ]
        },
    },
    "bindings": [{"role": "ops", "uids": [os.geteuid()]}],
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("low")
    policy = tmp / "policy.json"
    policy.write_text(json.dumps(OPS))
    with running_daemon(
        tmp / "state", None, env={"EDGE_AGENT_ACCESS__POLICY_FILE": str(policy)}, wait=False
    ) as d:
        deadline = time.monotonic() + 60
        while not accepts(d.socket):
            assert time.monotonic() < deadline and d.proc.poll() is None, d.log_path.read_text()[-2000:]
            time.sleep(0.1)
        yield d


def test_an_integer_of_5000_digits_is_a_400_not_a_500(daemon: Daemon) -> None:
    body = b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}"
    with uds_client(daemon.socket, timeout=30) as c:
        r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "not valid JSON" in r.json()["error"]["message"]
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(None, 403, id="reload-of-everything-needs-models-admin-on-every-model"),
        pytest.param({"model": "llama-3"}, 403, id="select-outside-the-pattern"),
    ],
)
def test_models_admin_on_some_models_cannot_reload_everything(
    daemon: Daemon, body: dict[str, str] | None, status: int
) -> None:
    path = "/admin/reload" if body is None else "/admin/select"
    with uds_client(daemon.socket, timeout=30) as c:
        r = c.post(path, json=body) if body is not None else c.post(path)
    assert r.status_code == status, r.text


def test_device_strings_cannot_style_or_escape_on_the_operators_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evil = "[link=http://evil.example]click[/link]\x1b[2J\x1b]8;;http://x\x07\r"
    assert "\x1b" not in shown(evil) and "\r" not in shown(evil)
    store = HubStore(tmp_path / "hub.db")
    store.record_state(
        "dev-a", StateReport("dev-a", True, "0.1", ("edge",), {}, evil, (evil,), policy_version=evil)
    )
    store.close()
    assert hub_main(["devices", "--db", str(tmp_path / "hub.db")]) == 0
    out = capsys.readouterr().out
    assert "\x1b[2J" not in out and "\x07" not in out
    assert "[link" in out  # the markup is shown as text, not applied
