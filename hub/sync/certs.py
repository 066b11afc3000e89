"""A small fleet PKI for MQTT over TLS: two CAs, the broker's and the clients' certificates.

For tests and for operators trying the fleet out (``edge-hub certs``); a production fleet would use
its own PKI with the same shape. The client certificate's CN is the MQTT identity the broker
enforces (``use_identity_as_username``): ``hub`` for hub workers, ``operator`` for the CLI, the
device id for a device.

Two CAs, because the broker has two listeners (mosquitto/mosquitto.conf): devices connect to the
device listener, which trusts only ``ca.crt`` and replaces the client id by the CN
(``use_username_as_clientid``), so one device cannot take over another's client id and session;
hub workers and operator tools (several processes per identity, each with its own client id)
connect to the service listener, which trusts only ``service-ca.crt``. ``ca.crt`` also signs the
broker's certificate: every client verifies the broker with ``ca.crt``.

Invariants: keys are ECDSA P-256 (Mosquitto/OpenSSL handle them everywhere); private keys are
written with mode 0600, atomically; an existing CA is reused, never overwritten, so certificates
issued later chain to the same root; the service identities (:data:`SERVICE_IDENTITIES`) are
signed by the service CA and every other CN by the device CA, so no device certificate can carry
the hub's or the operator's name (which the ACL grants everything).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=825)
SERVICE_IDENTITIES = ("hub", "operator")
"""CNs signed by the service CA (the ACL's ``user hub`` / ``user operator``); never device ids."""
DEVICE_CA = "ca"
SERVICE_CA = "service-ca"


@dataclass(frozen=True, slots=True)
class CertPaths:
    cert: Path
    key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def ensure_ca(directory: Path, name: str = DEVICE_CA) -> CertPaths:
    """Create ``<name>.crt``/``<name>.key`` in ``directory`` unless they exist (``ca``: devices and
    the broker; ``service-ca``: hub workers and operator tools)."""
    if name not in (DEVICE_CA, SERVICE_CA):
        raise ValueError(f"unknown CA {name!r}: {DEVICE_CA} or {SERVICE_CA}")
    cn = "edge-fleet-ca" if name == DEVICE_CA else "edge-fleet-service-ca"
    paths = CertPaths(directory / f"{name}.crt", directory / f"{name}.key")
    if paths.cert.is_file() and paths.key.is_file():
        return paths
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    _write(paths.key, _key_pem(key), 0o600)
    _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def issue(directory: Path, cn: str, *, server: bool = False, hosts: tuple[str, ...] = ()) -> CertPaths:
    """Issue ``<cn>.crt``/``<cn>.key`` signed by the right CA in ``directory`` (created if missing):
    the service CA for :data:`SERVICE_IDENTITIES`, the device CA for devices and the broker."""
    if server and cn in SERVICE_IDENTITIES:
        raise ValueError(f"{cn!r} is a client identity, not a broker name")
    ca_paths = ensure_ca(directory, SERVICE_CA if cn in SERVICE_IDENTITIES else DEVICE_CA)
    ca_key = serialization.load_pem_private_key(ca_paths.key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca_paths.cert.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    paths = CertPaths(directory / f"{cn}.crt", directory / f"{cn}.key")
    _write(paths.key, _key_pem(key), 0o600)
    _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


BROKER_HOSTS = ("localhost", "127.0.0.1")
"""Always in the broker certificate's SANs (a broker tried on one machine); a fleet adds the name
the boxes dial (``[hub] host``) with ``--broker-host``."""


def make_pki(
    directory: Path, clients: tuple[str, ...], broker_hosts: tuple[str, ...] = ()
) -> dict[str, CertPaths]:
    """Both CAs + ``broker`` (:data:`BROKER_HOSTS` and ``broker_hosts`` as SANs) + one client
    certificate per name. The broker certificate is issued anew (its SANs may change); client
    certificates too."""
    bad = [cn for cn in clients if not _valid_cn(cn)]
    if bad:
        raise ValueError(f"not a device id or service identity: {', '.join(map(repr, bad))}")
    out = {"ca": ensure_ca(directory), "service-ca": ensure_ca(directory, SERVICE_CA)}
    hosts = tuple(dict.fromkeys((*BROKER_HOSTS, *broker_hosts)))
    out["broker"] = issue(directory, "broker", server=True, hosts=hosts)
    for cn in clients:
        out[cn] = issue(directory, cn)
    return out


def make_test_pki(directory: Path, clients: tuple[str, ...]) -> dict[str, CertPaths]:
    """:func:`make_pki` for a broker on this machine."""
    return make_pki(directory, clients)


def _valid_cn(cn: str) -> bool:
    return cn != "broker" and re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", cn) is not None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, help="where the CAs and certificates are (kept 0700)")
    parser.add_argument(
        "clients", nargs="*", help="client CNs: hub, operator (service CA), device ids (device CA)"
    )
    parser.add_argument(
        "--broker-host",
        action="append",
        default=[],
        help="a name or address the boxes dial, added to the broker certificate (repeatable)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        made = make_pki(args.directory, tuple(args.clients), tuple(args.broker_host))
    except ValueError as exc:
        print(f"edge-hub certs: {exc}", file=sys.stderr)
        return 2
    os.chmod(args.directory, 0o700)
    hosts = ", ".join(dict.fromkeys((*BROKER_HOSTS, *args.broker_host)))
    print(f"certificates in {args.directory}: broker ({hosts}), {', '.join(made)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub.sync.certs", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = [
    "BROKER_HOSTS",
    "SERVICE_IDENTITIES",
    "CertPaths",
    "add_arguments",
    "ensure_ca",
    "issue",
    "main",
    "make_pki",
    "make_test_pki",
    "run",
]

if __name__ == "__main__":
    raise SystemExit(main())
