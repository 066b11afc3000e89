"""The shipped systemd units pass `systemd-analyze verify` and say what the service contract needs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
BIN = Path(sys.executable).parent
NO_SUCH_USER = re.compile(r"(user|group)\b.*\b(edge-agent|edge-hub)\b", re.IGNORECASE)

pytestmark = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


def _installed_copy(tmp_path: Path) -> list[Path]:
    """The units as `make install-service` writes them: ExecStart pointing at real executables."""
    out = []
    for unit in sorted(p for p in UNITS.iterdir() if p.suffix in (".service", ".socket", ".timer")):
        text = unit.read_text().replace("/usr/local/bin/", f"{BIN}/")
        target = tmp_path / unit.name
        target.write_text(text)
        out.append(target)
    return out


def test_units_verify_cleanly(tmp_path: Path) -> None:
    units = _installed_copy(tmp_path)
    assert [u.name for u in units] == [
        "edge-agent.service",
        "edge-agent.socket",
        "edge-hub-crl.service",
        "edge-hub-crl.timer",
        "edge-hub.service",
    ]
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    # verify exits 0 on unknown keys and bad values; it only warns. Any line naming our units is a
    # defect, except that the service users do not exist on a build machine (the install creates
    # them; systemd 252 does not check, other versions may warn).
    problems = [
        line
        for line in result.stderr.splitlines()
        if any(u.name in line for u in units) and not NO_SUCH_USER.search(line.rsplit(".service", 1)[-1])
    ]
    assert result.returncode == 0, result.stderr
    assert problems == []


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above is only worth something if verify reports defects in our files."""
    unit = _installed_copy(tmp_path)[0]
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notfy"))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, check=False
    )
    assert "Failed to parse service type" in result.stderr


@pytest.mark.parametrize(
    ("unit", "section", "key", "expected"),
    [
        pytest.param("edge-agent.service", "Service", "Type", "notify", id="notify-readiness"),
        pytest.param("edge-agent.service", "Service", "Restart", "on-failure", id="restart-on-failure"),
        pytest.param("edge-agent.service", "Service", "User", "edge-agent", id="dedicated-user"),
        pytest.param("edge-agent.service", "Service", "Group", "edge-agent", id="dedicated-group"),
        pytest.param("edge-agent.service", "Service", "StateDirectory", "edge-agent", id="state-dir"),
        pytest.param("edge-agent.service", "Service", "RuntimeDirectory", "edge-agent", id="runtime-dir"),
        pytest.param(
            "edge-agent.service", "Service", "ConfigurationDirectory", "edge-agent", id="config-dir"
        ),
        pytest.param("edge-agent.service", "Service", "ProtectSystem", "strict", id="protect-system"),
        pytest.param("edge-agent.service", "Service", "ProtectHome", "yes", id="protect-home"),
        pytest.param("edge-agent.service", "Service", "PrivateTmp", "yes", id="private-tmp"),
        pytest.param("edge-agent.service", "Service", "NoNewPrivileges", "yes", id="no-new-privileges"),
        pytest.param("edge-agent.service", "Service", "CapabilityBoundingSet", "", id="no-capabilities"),
        pytest.param("edge-agent.service", "Service", "SystemCallFilter", "@system-service", id="syscalls"),
        pytest.param("edge-agent.socket", "Socket", "SocketMode", "0660", id="socket-mode"),
        pytest.param("edge-agent.socket", "Socket", "SocketGroup", "edge-agent-clients", id="socket-group"),
        pytest.param("edge-agent.service", "Service", "StateDirectoryMode", "0700", id="state-dir-private"),
        pytest.param("edge-agent.service", "Service", "UMask", "0077", id="umask-private"),
        pytest.param("edge-hub.service", "Service", "User", "edge-hub", id="hub-user"),
    ],
)
def test_unit_settings(unit: str, section: str, key: str, expected: str) -> None:
    values = [v for k, v in _items(unit, section) if k == key]
    assert expected in values, f"{unit} [{section}] {key}: {values}"


def _items(unit: str, section: str) -> list[tuple[str, str]]:
    """Every (key, value) of a section, keeping repeated keys (configparser would merge them)."""
    items: list[tuple[str, str]] = []
    current = None
    for raw in (UNITS / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and "=" in line:
            key, value = line.split("=", 1)
            items.append((key.strip(), value.strip()))
    return items


def test_watchdog_and_address_families() -> None:
    service = dict(_items("edge-agent.service", "Service"))
    assert float(service["WatchdogSec"]) > 0
    families = set(service["RestrictAddressFamilies"].split())
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= families
    assert "MemoryMax" in service


def test_socket_path_matches_the_service_environment() -> None:
    listen = dict(_items("edge-agent.socket", "Socket"))["ListenStream"]
    env = [v for k, v in _items("edge-agent.service", "Service") if k == "Environment"]
    assert f"EDGE_AGENT_SERVER__SOCKET_PATH={listen}" in env


def test_install_service_stages_units_config_and_links(tmp_path: Path) -> None:
    """`make install-service` with DESTDIR: the real script, no user created, systemd untouched."""
    stage = tmp_path / "stage"
    env = {"PATH": "/usr/sbin:/usr/bin:/bin", "DESTDIR": str(stage), "PREFIX": "/opt/edge-agent"}
    result = subprocess.run(
        ["make", "-s", "install-service", "HUB=1"],
        cwd=UNITS.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    units = stage / "etc/systemd/system"
    assert sorted(p.name for p in units.iterdir()) == [
        "edge-agent.service",
        "edge-agent.socket",
        "edge-hub-crl.service",
        "edge-hub-crl.timer",
        "edge-hub.service",
    ]
    assert (stage / "usr/local/bin/edge-agent").readlink() == Path("/opt/edge-agent/bin/edge-agent")
    config = (stage / "etc/edge-agent/config.toml").read_text()
    assert 'state_dir = "/var/lib/edge-agent"' in config
    assert 'socket_path = "/run/edge-agent/edge-agent.sock"' in config
    assert 'socket_group = "edge-agent-clients"' in config
    assert (stage / "etc/edge-agent/config.toml").stat().st_mode & 0o777 == 0o644  # no secret in it
    assert (stage / "etc/edge-agent/mqtt").stat().st_mode & 0o777 == 0o750  # the key's directory
    listen_group = dict(_items("edge-agent.socket", "Socket"))["SocketGroup"]
    assert listen_group == "edge-agent-clients"
    # The installed configuration is valid for the agent, and points where the units listen.
    from agent.config import Settings, read_toml

    settings = Settings(**read_toml(stage / "etc/edge-agent/config.toml"))
    listen = dict(_items("edge-agent.socket", "Socket"))["ListenStream"]
    assert str(settings.socket_path) == listen
    # A second run keeps an edited configuration.
    (stage / "etc/edge-agent/config.toml").write_text(config + "\n# edited\n")
    again = subprocess.run(
        ["make", "-s", "install-service"],
        cwd=UNITS.parent,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0 and "kept" in again.stdout
    assert (stage / "etc/edge-agent/config.toml").read_text().endswith("# edited\n")
