"""Both command lines end to end: an operator publishes, a box enrolls, imports, lists, verifies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent.cli import main as agent_main
from hub.cli import main as hub_main
from tests.hub.test_models import float_onnx, minilm


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGE_HUB_REPO", str(tmp_path / "repo"))
    monkeypatch.setenv("HUB_PW", "s3cret passphrase")
    for key in [k for k in os.environ if k.startswith("EDGE_AGENT_")]:
        monkeypatch.delenv(key)
    return tmp_path


def hub(*args: str) -> int:
    return hub_main(list(args))


def agent(state: Path, *args: str) -> int:
    return agent_main(["--state-dir", str(state), *args])


def enroll(box: Path, repo: Path, device_id: str) -> int:
    """``edge-agent enroll`` of ``box`` in group ``lab`` with the repository's first root."""
    root = str(repo / "metadata" / "1.root.json")
    return agent(box, "enroll", "--root", root, "--device-id", device_id, "--group", "lab")


def test_operator_to_box_round_trip(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = env / "repo"
    assert (
        hub(
            "repo",
            "init",
            str(repo),
            "--root-threshold",
            "2",
            "--root-keys",
            "3",
            "--passphrase-env",
            "HUB_PW",
        )
        == 0
    )
    assert hub("model", "add", str(minilm()), "--id", "minilm", "--licence", "apache-2.0") == 0
    tiny = float_onnx(env / "tiny.onnx")
    assert hub("model", "quantize", str(tiny), "--to", "int8", "--id", "tiny") == 0
    out = capsys.readouterr().out
    assert "tiny-int8" in out and "reduction" in out
    assert hub("deployment", "set", "--group", "lab", "--model", "minilm", "--pin") == 0
    policy = env / "default.json"
    policy.write_text('{"roles": {}, "bindings": []}')
    assert hub("policy", "add", str(policy), "--group", "lab") == 0  # the lab's devices apply it
    assert hub("timestamp", "refresh") == 0
    assert hub("key", "revoke", "--role", "snapshot") == 0
    assert hub("root", "rotate") == 0
    assert hub("bundle", "export", str(env / "bundle.tar")) == 0
    capsys.readouterr()

    box = env / "box"
    assert enroll(box, repo, "box-7") == 0
    assert agent(box, "registry", "import", str(env / "bundle.tar")) == 0
    out = capsys.readouterr().out
    assert "+ models/minilm/1/model.onnx" in out and "tiny-int8" not in out  # not deployed to lab
    assert agent(box, "registry", "list", "--json") == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["device_id"] == "box-7" and listing["groups"] == ["lab"]
    assert [m["id"] for m in listing["models"]] == ["minilm"]
    assert listing["documents"] == ["deployments/lab.json", "policies/default.json"]
    assert agent(box, "registry", "verify") == 0
    assert agent(box, "registry", "remove", "minilm") == 0
    assert agent(box, "registry", "gc") == 0
    capsys.readouterr()
    assert agent(box, "registry", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out)["models"] == []


def test_refusals_name_the_reason_and_exit_1(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = env / "repo"
    assert hub("repo", "init", str(repo)) == 0
    assert hub("model", "add", str(minilm()), "--id", "minilm") == 0
    assert hub("bundle", "export", str(env / "b")) == 0
    box = env / "box"
    assert enroll(box, repo, "b") == 0
    blob = next((env / "b" / "targets" / "models").rglob("*.model.onnx"))
    data = bytearray(blob.read_bytes())
    blob.unlink()
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    capsys.readouterr()
    assert agent(box, "registry", "import", str(env / "b")) == 1
    err = capsys.readouterr().err
    assert "refused (blob_hash_mismatch)" in err and "models/minilm/1/model.onnx" in err


@pytest.mark.parametrize(
    ("document", "message"),
    [
        pytest.param({"roles": 5}, "roles", id="roles-not-an-object"),
        pytest.param({"roles": {}, "extra": 1}, "extra: unknown key", id="unknown-key"),
        pytest.param({"bindings": []}, "roles: required key is missing", id="no-roles"),
        pytest.param(
            {"roles": {"app": {"permissions": [{"actions": ["fly"]}]}}},
            "unknown action 'fly'",
            id="unknown-action",
        ),
        pytest.param(
            {"roles": {}, "bindings": [{"role": "ghost", "uids": [1000]}]},
            "names role 'ghost'",
            id="unbound-role",
        ),
        pytest.param(
            {"roles": {"app": {"limits": {"max_tokens": 0}}}}, "max_tokens", id="non-positive-limit"
        ),
        pytest.param({"roles": {"bad name": {}}}, "role name 'bad name'", id="bad-role-name"),
        pytest.param({"version": -1, "roles": {}}, "version", id="negative-version"),
    ],
)
def test_an_invalid_policy_is_refused_before_anything_is_signed(
    env: Path, capsys: pytest.CaptureFixture[str], document: dict[str, object], message: str
) -> None:
    assert hub("repo", "init", str(env / "repo")) == 0
    published = sorted(p.name for p in (env / "repo" / "metadata").iterdir())
    path = env / "bad-policy.json"
    path.write_text(json.dumps(document))
    capsys.readouterr()
    assert hub("policy", "add", str(path)) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in (env / "repo" / "metadata").iterdir()) == published  # nothing signed
    assert not (env / "repo" / "targets").exists() or not any((env / "repo" / "targets").rglob("*policy*"))


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["model", "add", "nope.gguf", "--id", "x"], 1, "no such file"),
        (["model", "add", "{minilm}", "--id", "Bad Id"], 2, "bad model id"),
        (["model", "quantize", "{minilm}", "--to", "q8_0", "--id", "m"], 2, "choose from int8"),
        (["deployment", "set", "--group", "lab", "--model", "ghost"], 2, "not published"),
        (
            ["deployment", "set", "--group", "lab", "--model", "minilm", "--window", "9-5"],
            2,
            "maintenance_window",
        ),
        (["policy", "add", "{bad_json}"], 2, "not valid JSON"),
        (["policy", "add", "{nowhere}"], 1, "cannot read policy"),
        (["key", "revoke", "--role", "root", "--keyid", "zz"], 1, "does not name exactly one key"),
        (["model", "list", "--repo", "{nowhere}"], 1, "not a repository"),
    ],
    ids=[
        "missing-file",
        "bad-id",
        "gguf-quant-for-onnx",
        "unknown-model",
        "bad-window",
        "bad-policy",
        "missing-policy",
        "bad-keyid",
        "no-repo",
    ],
)
def test_hub_bad_input(
    env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    assert hub("repo", "init", str(env / "repo")) == 0
    assert hub("model", "add", str(minilm()), "--id", "minilm") == 0
    bad_json = env / "bad.json"
    bad_json.write_text("{")
    argv = [a.format(minilm=minilm(), bad_json=bad_json, nowhere=env / "nowhere") for a in argv]
    capsys.readouterr()
    assert hub(*argv) == code
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["registry", "import", "{bundle}"], 1, "not_enrolled"),
        (["enroll", "--root", "{missing}", "--device-id", "b", "--group", "lab"], 2, "cannot read"),
        (["enroll", "--root", "{garbage}", "--device-id", "b", "--group", "lab"], 1, "refused (malformed)"),
        (["enroll", "--root", "{root}", "--device-id", "b c", "--group", "lab"], 2, "bad device id"),
        (["registry", "remove", "ghost"], 1, "not installed"),
    ],
    ids=["import-before-enroll", "missing-root", "garbage-root", "bad-device-id", "remove-unknown"],
)
def test_agent_bad_input(
    env: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    assert hub("repo", "init", str(env / "repo")) == 0
    assert hub("bundle", "export", str(env / "b")) == 0
    garbage = env / "garbage.json"
    garbage.write_text("{}")
    fmt = {
        "bundle": env / "b",
        "missing": env / "missing.json",
        "garbage": garbage,
        "root": env / "repo" / "metadata" / "1.root.json",
    }
    capsys.readouterr()
    assert agent(env / "box", *[a.format(**fmt) for a in argv]) == code
    assert message in capsys.readouterr().err
