"""Revocation and rotation of device certificates (issue 15, high #1) on a real Mosquitto that loads
the shipped config's ``crlfile``, with certificates from :mod:`hub.sync.certs` and the
``edge-hub device`` commands."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import shutil
import signal
from pathlib import Path

import pytest
from cryptography import x509

from fleet.errors import NotConnected
from fleet.mqtt import MqttClient
from hub.cli import main as hub_main
from hub.sync.certs import CLIENT_DAYS, PkiError, issue, load_index, make_test_pki
from tests.sync.broker import Broker, free_port


async def can_connect(broker: Broker, cn: str, certdir: Path | None = None, timeout: float = 4.0) -> bool:
    config = broker.client_config(cn)
    if certdir is not None:
        config = dataclasses.replace(config, cert_file=certdir / f"{cn}.crt", key_file=certdir / f"{cn}.key")
    client = MqttClient(config)
    await client.start()
    try:
        await client.wait_connected(timeout)
        return True
    except NotConnected:
        return False
    finally:
        await client.close(end_session=True)


def hand_over(broker: Broker) -> None:
    """What edge-hub-crl.service does after the CA's files changed: ``edge-hub broker crl``."""
    dest = broker.install().config.parent
    assert hub_main(["broker", "crl", "--pki", str(broker.certdir), "--dest", str(dest)]) == 0


def reload(broker: Broker) -> None:
    hand_over(broker)
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGHUP)


@pytest.fixture
def fleet_broker(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A broker with a PKI of its own (revocations must not touch the session's)."""
    pki = tmp_path / "pki"
    make_test_pki(pki, ("hub", "operator", "dev-a", "dev-b", "dev-c"))
    b = Broker(tmp_path / "broker", pki, free_port())
    b.workdir.mkdir()
    b.start()
    yield b
    b.cleanup()


REVOCATION_CASES = [
    pytest.param("reload", id="revoked-refused-after-sighup"),
    pytest.param("restart", id="revoked-refused-after-restart"),
]


@pytest.mark.parametrize("apply", REVOCATION_CASES)
async def test_a_revoked_device_certificate_is_refused(fleet_broker: Broker, apply: str) -> None:
    assert await can_connect(fleet_broker, "dev-a")
    assert hub_main(["device", "revoke", "dev-a", "--pki", str(fleet_broker.certdir)]) == 0
    if apply == "reload":
        reload(fleet_broker)
        await asyncio.sleep(1.0)
    else:
        hand_over(fleet_broker)
        fleet_broker.restart()
    assert not await can_connect(fleet_broker, "dev-a")
    assert await can_connect(fleet_broker, "dev-b")  # the others are untouched


async def test_a_revoked_hub_certificate_is_refused_on_the_service_listener(fleet_broker: Broker) -> None:
    """The service CA has its own CRL (service-crl.pem), checked by the service listener."""
    assert await can_connect(fleet_broker, "hub")
    assert hub_main(["device", "revoke", "hub", "--pki", str(fleet_broker.certdir)]) == 0
    reload(fleet_broker)
    await asyncio.sleep(1.0)
    assert not await can_connect(fleet_broker, "hub")
    assert await can_connect(fleet_broker, "operator")
    assert await can_connect(fleet_broker, "dev-a")


async def test_rotation_refuses_the_old_certificate_and_accepts_the_new(
    fleet_broker: Broker, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for ext in ("crt", "key"):
        shutil.copy(fleet_broker.certdir / f"dev-c.{ext}", old / f"dev-c.{ext}")
    shutil.copy(fleet_broker.certdir / "ca.crt", old / "ca.crt")
    assert hub_main(["device", "rotate", "dev-c", "--pki", str(fleet_broker.certdir)]) == 0
    reload(fleet_broker)
    await asyncio.sleep(1.0)
    assert await can_connect(fleet_broker, "dev-c")  # the new files, written in place
    assert not await can_connect(fleet_broker, "dev-c", certdir=old)
    states = {
        e["serial"]: bool(e["revoked_at"])
        for e in load_index(fleet_broker.certdir)["certificates"]
        if e["cn"] == "dev-c"
    }
    assert sorted(states.values()) == [False, True]


def test_lifetimes_are_short(tmp_path: Path) -> None:
    make_test_pki(tmp_path, ("dev-a",))
    now = dt.datetime.now(dt.UTC)

    def days(name: str) -> float:
        cert = x509.load_pem_x509_certificate((tmp_path / f"{name}.crt").read_bytes())
        return (cert.not_valid_after_utc - now).total_seconds() / 86400

    assert days("dev-a") <= CLIENT_DAYS <= 90
    assert days("broker") <= 397
    crl = x509.load_pem_x509_crl((tmp_path / "crl.pem").read_bytes())
    assert crl.next_update_utc is not None and (crl.next_update_utc - now).days <= 30


@pytest.mark.parametrize(
    "cn",
    [
        pytest.param("ca", id="ca-would-overwrite-the-ca-files"),
        pytest.param("broker", id="broker-would-overwrite-the-broker-files"),
        pytest.param("Dev-A", id="uppercase"),
        pytest.param("a/b", id="topic-separator"),
        pytest.param("+", id="wildcard"),
    ],
)
def test_a_device_certificate_needs_an_unreserved_device_id(tmp_path: Path, cn: str) -> None:
    make_test_pki(tmp_path, ())
    ca_before = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(PkiError):
        issue(tmp_path, cn)
    assert (tmp_path / "ca.crt").read_bytes() == ca_before


def test_revoking_an_unknown_device_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_test_pki(tmp_path, ("dev-a",))
    assert hub_main(["device", "revoke", "dev-zz", "--pki", str(tmp_path)]) == 1
    assert "no certificate was issued to 'dev-zz'" in capsys.readouterr().out


async def test_a_connected_revoked_device_is_disconnected_on_sighup(fleet_broker: Broker) -> None:
    """The CRL stops new handshakes only; the plugin's revoked list cuts the open connection."""
    dev = MqttClient(fleet_broker.client_config("dev-a"))
    other = MqttClient(fleet_broker.client_config("dev-b"))
    for c in (dev, other):
        await c.start()
        await c.wait_connected(10)
    try:
        assert hub_main(["device", "revoke", "dev-a", "--pki", str(fleet_broker.certdir)]) == 0
        reload(fleet_broker)
        await asyncio.wait_for(dev.wait_disconnected(), 10)
        await asyncio.sleep(2.0)  # it tries to come back: the CRL refuses the handshake
        assert not dev.is_connected
        assert other.is_connected
    finally:
        await dev.close()
        await other.close(end_session=True)


def test_issuing_again_lifts_an_outright_revocation(tmp_path: Path) -> None:
    from hub.sync.certs import revoked_cns

    make_test_pki(tmp_path, ("dev-a",))
    assert hub_main(["device", "revoke", "dev-a", "--pki", str(tmp_path)]) == 0
    assert revoked_cns(tmp_path) == ["dev-a"]
    assert hub_main(["device", "rotate", "dev-a", "--pki", str(tmp_path)]) == 0  # a rotation adds none
    assert hub_main(["device", "issue", "dev-a", "--pki", str(tmp_path)]) == 0  # new hardware, same id
    assert revoked_cns(tmp_path) == []
