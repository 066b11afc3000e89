"""A small fleet CA for MQTT over TLS: CA, broker and client certificates (``cryptography``).

For tests and for operators trying the fleet out; a production fleet would use its own PKI. The
client certificate's CN is the MQTT identity the broker enforces (``use_identity_as_username``):
``hub`` for hub workers, ``operator`` for the CLI, the device id for a device.

Invariants: keys are ECDSA P-256 (Mosquitto/OpenSSL handle them everywhere); private
keys are written with mode 0600, atomically; an existing CA is reused, never overwritten, so
certificates issued later chain to the same root.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = dt.timedelta(days=825)


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


def ensure_ca(directory: Path, cn: str = "edge-fleet-ca") -> CertPaths:
    """Create ``ca.crt``/``ca.key`` in ``directory`` unless they exist."""
    paths = CertPaths(directory / "ca.crt", directory / "ca.key")
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


def issue(
    directory: Path,
    cn: str,
    *,
    server: bool = False,
    hosts: tuple[str, ...] = (),
    dest: Path | None = None,
) -> CertPaths:
    """Issue ``<cn>.crt``/``<cn>.key`` signed by the CA in ``directory`` (created if missing),
    written to ``dest`` (default: ``directory``)."""
    ca_paths = ensure_ca(directory)
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
    out = directory if dest is None else dest
    paths = CertPaths(out / f"{cn}.crt", out / f"{cn}.key")
    _write(paths.key, _key_pem(key), 0o600)
    _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return paths


def make_test_pki(directory: Path, clients: tuple[str, ...]) -> dict[str, CertPaths]:
    """CA + ``broker`` (localhost/127.0.0.1) + one client certificate per name."""
    out = {"ca": ensure_ca(directory)}
    out["broker"] = issue(directory, "broker", server=True, hosts=("localhost", "127.0.0.1"))
    for cn in clients:
        out[cn] = issue(directory, cn)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hub.sync.certs", description=__doc__)
    parser.add_argument("directory", type=Path)
    parser.add_argument("clients", nargs="*", help="client CNs: hub, operator, device ids")
    parser.add_argument("--broker-host", action="append", default=[], help="extra SAN for the broker")
    args = parser.parse_args(argv)
    ensure_ca(args.directory)
    issue(args.directory, "broker", server=True, hosts=("localhost", "127.0.0.1", *args.broker_host))
    for cn in args.clients:
        issue(args.directory, cn)
    print(f"certificates in {args.directory}")
    return 0


__all__ = ["CertPaths", "ensure_ca", "issue", "main", "make_test_pki"]

if __name__ == "__main__":
    raise SystemExit(main())
