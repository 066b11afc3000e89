"""The device's MQTT key must be the service user's alone (issue 15, high #1): the real daemon
refuses to start on a key that group or others may read or write (exit 2, one line naming the key
and the mode), as the hub refuses its signing keys; ``edge-agent sync status`` names the problem.
With the key at 0600 the daemon starts and connects to a real broker."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.errors import InsecureKeyFile
from fleet.mqtt import MqttClient, check_private_key
from tests.daemon import running_daemon
from tests.sync.broker import Broker
from tests.sync.helpers import enrolled_device, new_repo


def hub_env(broker: Broker, key: Path) -> dict[str, str]:
    c = broker.certdir
    return {
        "EDGE_AGENT_HUB__HOST": "127.0.0.1",
        "EDGE_AGENT_HUB__PORT": str(broker.port),
        "EDGE_AGENT_HUB__CA_FILE": str(c / "ca.crt"),
        "EDGE_AGENT_HUB__CERT_FILE": str(c / "dev-a.crt"),
        "EDGE_AGENT_HUB__KEY_FILE": str(key),
        "EDGE_AGENT_HUB__DEVICE_ID": "dev-a",
    }


MODES = [
    pytest.param(0o640, id="group-readable-0640"),
    pytest.param(0o604, id="world-readable-0604"),
    pytest.param(0o660, id="group-writable-0660"),
    pytest.param(0o644, id="world-readable-0644"),
]


@pytest.mark.parametrize("mode", MODES)
def test_the_daemon_refuses_to_start_on_a_key_others_may_read(
    broker: Broker, tmp_path: Path, mode: int
) -> None:
    key = tmp_path / "device.key"
    shutil.copy(broker.certdir / "dev-a.key", key)
    key.chmod(mode)
    with running_daemon(tmp_path / "state", None, env=hub_env(broker, key), wait=False) as daemon:
        assert daemon.proc.wait(60) == 2
        lines = daemon.log_path.read_text()
    assert "hub.key_file" in lines and f"mode {mode:04o}" in lines, lines[-2000:]
    assert "readable or writable by group or others" in lines


def test_sync_status_names_an_insecure_key(broker: Broker, tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    shutil.copy(broker.certdir / "dev-a.key", key)
    key.chmod(0o640)
    env = {**hub_env(broker, key), "EDGE_AGENT_STATE_DIR": str(tmp_path / "state")}
    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "sync", "status", "--json"],
        env={**env, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        text=True,
        check=False,
    )
    assert "readable or writable by group or others" in out.stdout + out.stderr


def test_the_daemon_starts_and_connects_with_a_private_key(broker: Broker, tmp_path: Path) -> None:
    key = tmp_path / "device.key"
    shutil.copy(broker.certdir / "dev-a.key", key)
    key.chmod(0o600)
    repo = new_repo(tmp_path / "repo")
    enrolled_device(tmp_path / "state", repo.path, "dev-a")
    with running_daemon(tmp_path / "state", None, env=hub_env(broker, key), wait=False) as daemon:
        deadline = time.monotonic() + 60
        connected = False
        while time.monotonic() < deadline and not connected:
            assert daemon.proc.poll() is None, daemon.log_path.read_text()[-2000:]
            connected = any(line.get("event") == "mqtt_connected" for line in daemon.log_lines())
            time.sleep(0.2)
        assert connected, daemon.log_path.read_text()[-2000:]


@pytest.mark.parametrize("mode", [0o400, 0o600])
def test_owner_only_modes_pass(tmp_path: Path, mode: int) -> None:
    key = tmp_path / "k"
    key.write_bytes(b"x")
    key.chmod(mode)
    check_private_key(key)


def test_the_mqtt_adapter_itself_refuses_such_a_key(broker: Broker, tmp_path: Path) -> None:
    """The hub's key too: the check is in fleet.mqtt, which both sides use."""
    key = tmp_path / "hub.key"
    shutil.copy(broker.certdir / "hub.key", key)
    key.chmod(0o640)
    with pytest.raises(InsecureKeyFile):
        MqttClient(dataclasses.replace(broker.client_config("hub"), key_file=key))
