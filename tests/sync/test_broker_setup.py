"""The broker as docs/operations.md installs and starts it: `edge-hub certs`, `edge-hub broker
install`, `mosquitto -c <dest>/mosquitto.conf` as root; who may connect where; a device cannot
take over another device's client id."""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import ssl
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from cryptography import x509

from fleet.messages import Incoming, Outgoing, device_topic
from fleet.mqtt import MqttClient
from hub.cli import main as hub_main
from hub.sync.broker import MOSQUITTO, BrokerSetupError, install, render
from tests.sync.broker import REPO, Broker, free_port

ROOT = os.geteuid() == 0

RENDER_CASES = [
    pytest.param("a {x} b", {"x": "1"}, "a 1 b", None, id="filled"),
    pytest.param("a {x} {y}", {"x": "1"}, None, "no value for placeholder(s) y", id="missing-value"),
    pytest.param(
        "a {x}", {"x": "1", "plugin": "p"}, None, "has no placeholder(s) plugin", id="unknown-value"
    ),
]


@pytest.mark.parametrize(("template", "values", "rendered", "refusal"), RENDER_CASES)
def test_render_fills_every_placeholder_or_refuses_by_name(
    template: str, values: dict[str, str], rendered: str | None, refusal: str | None
) -> None:
    if refusal is None:
        assert render(template, values) == rendered
        return
    with pytest.raises(BrokerSetupError) as err:
        render(template, values)
    assert refusal in str(err.value)


def test_the_shipped_config_has_only_the_placeholders_install_fills(broker: Broker) -> None:
    layout = broker.install()
    text = layout.config.read_text()
    assert "{" not in text and "}" not in text
    assert f"acl_file {layout.acl}" in text
    assert f"persistence_location {layout.data}/" in text


def run_cli(argv: list[str]) -> int:
    return hub_main(argv)


@pytest.mark.skipif(not ROOT, reason="Mosquitto changes user only when started as root")
def test_install_as_root_leaves_files_the_broker_user_alone_can_read(certdir: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="edge-broker-test-"))
    base.chmod(0o755)  # like /etc/mosquitto and /var/lib/mosquitto
    try:
        layout = install(REPO / "mosquitto", certdir, base / "etc", data=base / "data")
        mosq = pwd.getpwnam("mosquitto")
        key = (layout.certdir / "broker.key").stat()
        assert (key.st_uid, key.st_gid, stat.S_IMODE(key.st_mode)) == (0, mosq.pw_gid, 0o640)
        data = layout.data.stat()
        assert (data.st_uid, stat.S_IMODE(data.st_mode)) == (mosq.pw_uid, 0o700)
        # A destination under a directory the broker user cannot search is refused, naming it.
        private = base / "private"
        private.mkdir(mode=0o700)
        with pytest.raises(BrokerSetupError, match=f"{private} is not searchable by mosquitto"):
            install(REPO / "mosquitto", certdir, private / "etc", data=private / "data")
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=True)


def tls_accepted(port: int, certdir: Path, cn: str, server_name: str = "127.0.0.1") -> bool:
    """Whether the listener on ``port`` takes ``cn``'s certificate (a refusal arrives as an alert
    on the first read under TLS 1.3; an accepted client is left waiting for its CONNECT)."""
    ctx = ssl.create_default_context(cafile=str(certdir / "ca.crt"))
    ctx.load_cert_chain(str(certdir / f"{cn}.crt"), str(certdir / f"{cn}.key"))
    with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=server_name) as tls:
                tls.settimeout(0.5)
                try:
                    return tls.recv(1) != b""
                except TimeoutError:
                    return True
        except (ssl.SSLError, ConnectionResetError):
            return False


LISTENER_CASES = [
    pytest.param("dev-a", "device", True, id="device-on-device-listener"),
    pytest.param("hub", "service", True, id="hub-on-service-listener"),
    pytest.param("operator", "service", True, id="operator-on-service-listener"),
    pytest.param("dev-a", "service", False, id="device-on-service-listener"),
    pytest.param("hub", "device", False, id="hub-on-device-listener"),
]


@pytest.mark.parametrize(("cn", "listener", "accepted"), LISTENER_CASES)
def test_each_listener_takes_only_its_own_ca(
    broker: Broker, certdir: Path, cn: str, listener: str, accepted: bool
) -> None:
    port = broker.port if listener == "device" else broker.service_port
    assert tls_accepted(port, certdir, cn) is accepted


async def test_a_device_cannot_take_over_another_devices_client_id(broker: Broker) -> None:
    """dev-a connecting with client id 'dev-b' stays client 'dev-a' (use_username_as_clientid):
    dev-b keeps its connection and its session, and still gets its messages."""
    got: asyncio.Queue[Incoming] = asyncio.Queue()
    victim = MqttClient(broker.client_config("dev-b", session_expiry_s=300))
    hub = MqttClient(broker.client_config("hub", client_id="hub-takeover-test"))
    intruder = MqttClient(broker.client_config("dev-a", client_id="dev-b"))
    try:
        for c in (victim, hub):
            await c.start()
            await c.wait_connected(10)
        await victim.subscribe(device_topic("dev-b", "blobs"), got.put_nowait)
        await intruder.start()
        await intruder.wait_connected(10)
        await asyncio.sleep(1.0)
        assert victim.is_connected and victim.connects == 1, "dev-b was knocked off"
        await hub.publish(Outgoing(device_topic("dev-b", "blobs"), b"still yours"))
        assert (await asyncio.wait_for(got.get(), 5)).payload == b"still yours"
        log = broker.log_path.read_text()
        assert "Client dev-b already connected" not in log
    finally:
        for c in (intruder, hub, victim):
            await c.close(end_session=c is victim)


@pytest.mark.skipif(not ROOT, reason="the documented start is as root (Mosquitto drops to its user)")
def test_the_documented_broker_starts_as_root_for_a_named_host(tmp_path: Path) -> None:
    """docs/operations.md, "The broker", step by step: certificates with the fleet's broker name,
    the install, `mosquitto -c` as root; the broker runs as `mosquitto`, reads its 0640 key, and
    a device verifying the broker by that name connects; the log has no error and no warning but
    the two documented ACL ones."""
    pki = tmp_path / "pki"
    dest = Path(tempfile.mkdtemp(prefix="edge-broker-doc-"))
    dest.chmod(0o755)  # like /etc/mosquitto and /var/lib/mosquitto
    port, service_port = free_port(), free_port()
    assert (
        run_cli(["certs", str(pki), "hub", "operator", "dev-a", "--broker-host", "broker.example.net"]) == 0
    )
    argv = ["broker", "install", "--pki", str(pki), "--dest", str(dest / "etc"), "--data", str(dest / "data")]
    argv += ["--source", str(REPO / "mosquitto"), "--port", str(port), "--service-port", str(service_port)]
    assert run_cli(argv) == 0
    log_path = tmp_path / "mosquitto.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(dest / "etc" / "mosquitto.conf")], stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 10
        while not tls_accepted_quiet(port, pki, "dev-a", "broker.example.net"):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        assert int(uid) == pwd.getpwnam("mosquitto").pw_uid
        san = x509.load_pem_x509_certificate(
            (pki / "broker.crt").read_bytes()
        ).extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert "broker.example.net" in san.value.get_values_for_type(x509.DNSName)
        assert tls_accepted(service_port, pki, "hub", "broker.example.net")
    finally:
        proc.terminate()
        proc.wait(10)
        subprocess.run(["rm", "-rf", str(dest)], check=True)
    text = log_path.read_text()
    problems = [
        line
        for line in text.splitlines()
        if ("Error:" in line or "Warning" in line) and line.split(": ", 1)[-1] not in EXPECTED_WARNINGS
    ]
    assert not problems, text


EXPECTED_WARNINGS = {
    "Warning: ACL pattern 'edge/v1/repo/meta/#' does not contain '%c' or '%u'.",
    "Warning: ACL pattern 'edge/v1/repo/blobs/get' does not contain '%c' or '%u'.",
}
"""Mosquitto warns about every ACL pattern that names no client; these two are the fleet-wide
topics (metadata read, chunk requests write) that every device needs (docs/operations.md)."""


def tls_accepted_quiet(port: int, certdir: Path, cn: str, server_name: str) -> bool:
    try:
        return tls_accepted(port, certdir, cn, server_name)
    except OSError:
        return False


CERT_CASES = [
    pytest.param("broker", "cannot issue a client certificate for 'broker'", id="broker-name-as-client"),
    pytest.param("ca", "cannot issue a client certificate for 'ca'", id="ca-file-name-as-client"),
    pytest.param("Dev_Upper", "bad device id 'Dev_Upper'", id="not-a-device-id"),
    pytest.param("dev/1", "bad device id 'dev/1'", id="slash"),
]


@pytest.mark.parametrize(("cn", "message"), CERT_CASES)
def test_certs_refuses_names_that_are_not_identities(
    tmp_path: Path, cn: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(["certs", str(tmp_path / "pki"), cn]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("cn", "issuer"), [("hub", "service-ca"), ("operator", "service-ca"), ("dev-a", "ca")]
)
def test_service_identities_are_signed_by_the_service_ca(certdir: Path, cn: str, issuer: str) -> None:
    cert = x509.load_pem_x509_certificate((certdir / f"{cn}.crt").read_bytes())
    ca = x509.load_pem_x509_certificate((certdir / f"{issuer}.crt").read_bytes())
    assert cert.issuer == ca.subject
