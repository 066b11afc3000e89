"""Configuration: defaults, precedence, and a table of named bad configurations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from agent.config import load_settings
from agent.errors import ConfigError


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("EDGE_AGENT_"):
            monkeypatch.delenv(key)


def test_builtin_defaults_run_the_demo_under_var() -> None:
    s = load_settings(None)
    assert s.state_dir == Path("var")
    assert s.socket_path == Path("var/run/edge-agent.sock")
    assert s.server.socket_mode == 0o660
    assert s.log.format == "auto"


def test_file_then_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('state_dir = "/srv/edge"\n[engine]\nn_ctx = 8192\nmax_queue = 3\n')
    monkeypatch.setenv("EDGE_AGENT_ENGINE__N_CTX", "1024")
    s = load_settings(cfg)
    assert s.state_dir == Path("/srv/edge")
    assert s.engine.n_ctx == 1024  # environment wins over the file
    assert s.engine.max_queue == 3
    assert s.socket_path == Path("/srv/edge/run/edge-agent.sock")


def test_config_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[server]\nsocket_mode = "0600"\n')
    monkeypatch.setenv("EDGE_AGENT_CONFIG", str(cfg))
    assert load_settings(None).server.socket_mode == 0o600


def test_example_config_is_valid_and_equals_defaults() -> None:
    example = Path(__file__).parent.parent / "config.example.toml"
    assert load_settings(example) == load_settings(None)


BAD_FILES = [
    pytest.param(
        "[sync]\nretry_initial_s = 600\nretry_max_s = 60\n",
        "sync.retry_max_s = 60: must be at least retry_initial_s",
        id="retry-cap-below-first-delay",
    ),
    pytest.param(
        "[hub]\nbackoff_min_s = 60\nbackoff_max_s = 5\n",
        "hub.backoff_max_s = 5: must be at least backoff_min_s",
        id="backoff-cap-below-minimum",
    ),
    pytest.param(
        '[server]\nsocket_mode = "rw-rw----"\n',
        "server.socket_mode = 'rw-rw----': expected an octal file mode such as '0660'",
        id="mode-not-octal",
    ),
    pytest.param(
        '[server]\nsocket_mode = "0440"\n',
        "server.socket_mode = '0440': expected a mode that lets the owner read and write (at least 0600)",
        id="mode-owner-cannot-write",
    ),
    pytest.param(
        "[engine]\nn_ctx = 12\n",
        "engine.n_ctx = 12: Input should be greater than or equal to 128",
        id="ctx-too-small",
    ),
    pytest.param(
        '[engine]\nn_threads = "four"\n',
        "engine.n_threads = 'four': Input should be a valid integer, unable to parse string as an integer",
        id="threads-not-int",
    ),
    pytest.param(
        '[log]\nlevel = "loud"\n',
        "log.level = 'loud': Input should be 'debug', 'info', 'warning' or 'error'",
        id="unknown-log-level",
    ),
    pytest.param(
        '[server]\nsockt_path = "/tmp/x"\n',
        "server.sockt_path = '/tmp/x': unknown setting",
        id="typo-in-key",
    ),
    pytest.param(
        "[server]\nshutdown_grace_s = -1\n",
        "server.shutdown_grace_s = -1: Input should be greater than or equal to 0",
        id="negative-grace",
    ),
    pytest.param(
        "[engine\nn_ctx = 1\n",
        "invalid TOML",
        id="toml-syntax",
    ),
]


@pytest.mark.parametrize(("content", "expected"), BAD_FILES)
def test_bad_config_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content)
    assert main(["--config", str(cfg), "run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert expected in err
    assert err.startswith("config error")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({"EDGE_AGENT_ENGINE__N_BATCH": "x"}, "engine.n_batch = 'x'", id="env-not-int"),
        pytest.param({"EDGE_AGENT_LOG__FORMAT": "xml"}, "log.format = 'xml'", id="env-bad-choice"),
        pytest.param(
            {"EDGE_AGENT_SERVER__MAX_BODY_BYTES": "10"}, "server.max_body_bytes = '10'", id="env-range"
        ),
    ],
)
def test_bad_environment_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: dict[str, str], expected: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "absent.toml")


def test_real_process_exit_status_is_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[engine]\nn_ctx = 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--config", str(cfg), "run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"config error ({cfg}): engine.n_ctx = 1: Input should be greater than or equal to 128"
    ]
