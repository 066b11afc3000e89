"""A small fleet CA for MQTT over TLS: CA, broker and client certificates, revocation (``cryptography``).

For tests and for small fleets; a large fleet may use its own PKI (then it must publish a CRL the
broker reads the same way). The client certificate's CN is the MQTT identity the broker enforces
(``use_identity_as_username``): ``hub`` for hub workers, ``operator`` for the CLI, the device id
for a device.

Files in the CA directory: ``ca.crt``/``ca.key``, ``<cn>.crt``/``<cn>.key`` per identity,
``issued.json`` (every certificate issued: CN, serial, expiry, revocation), ``crl.pem``, the
certificate revocation list the broker loads (``crlfile``; re-read on SIGHUP), and ``revoked.txt``,
the CNs revoked outright, which the broker plugin refuses and disconnects on SIGHUP.

Invariants:
- Keys are ECDSA P-256 (Mosquitto/OpenSSL handle them everywhere); private keys are written with
  mode 0600, atomically; an existing CA is reused, never overwritten, so certificates issued later
  chain to the same root.
- Lifetimes: client certificates :data:`CLIENT_DAYS` (90) days, the broker's
  :data:`SERVER_DAYS` (397), the CA :data:`CA_DAYS` (5 years). A stolen device key is useful until
  its certificate is revoked or expires, whichever comes first.
- A CRL always exists once the CA does (empty at first), because a broker with ``crlfile`` refuses
  every client when the file is missing; it is valid for :data:`CRL_DAYS` (30) days and must be
  re-signed before that (``edge-hub device crl``, also done by every revoke and rotate), else the
  broker refuses every client. Its CRL number only grows.
- A device certificate's CN must be a device id that is not reserved (``hub``, ``operator``, ``ca``,
  ``broker``: broker roles and this directory's own file names).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.errors import ProtocolError
from fleet.messages import check_device_id

CA_DAYS = 1826
SERVER_DAYS = 397
CLIENT_DAYS = 90
CRL_DAYS = 30
PRIVILEGED = ("hub", "operator")
"""Client CNs that are broker roles, not devices (mosquitto/acl, plugin_opt_privileged)."""
INDEX = "issued.json"
CRL = "crl.pem"
REVOKED = "revoked.txt"
"""CNs revoked outright (``revoke``, not ``rotate``), one a line: the broker plugin refuses them
and disconnects them on SIGHUP (the CRL only stops new TLS handshakes)."""


class PkiError(Exception):
    """A certificate cannot be issued, revoked or the CRL written (bad name, unknown device ...)."""


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
        if not (directory / CRL).is_file():  # a CA made before revocation existed
            write_crl(directory)
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
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    _write(paths.key, _key_pem(key), 0o600)
    _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    write_crl(directory)
    return paths


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_paths = ensure_ca(directory)
    ca_key = serialization.load_pem_private_key(ca_paths.key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca_paths.cert.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the CA key is not an EC key")
    return ca_cert, ca_key


def load_index(directory: Path) -> dict[str, Any]:
    """``issued.json``: ``{"crl_number": n, "certificates": [{"cn", "serial", "not_after",
    "revoked_at"}]}`` (serial as decimal string; times as ISO 8601 UTC)."""
    path = directory / INDEX
    if not path.is_file():
        return {"crl_number": 0, "certificates": []}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _save_index(directory: Path, index: dict[str, Any]) -> None:
    _write(directory / INDEX, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode(), 0o644)


def write_crl(directory: Path, *, days: int = CRL_DAYS) -> Path:
    """Sign ``crl.pem`` from the index: every revoked certificate that has not expired yet, valid
    for ``days``, with the next CRL number. Atomic; returns its path."""
    index = load_index(directory)
    ca_paths = CertPaths(directory / "ca.crt", directory / "ca.key")
    ca_key = serialization.load_pem_private_key(ca_paths.key.read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca_paths.cert.read_bytes())
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the CA key is not an EC key")
    now = dt.datetime.now(dt.UTC)
    number = int(index.get("crl_number", 0)) + 1
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for entry in index["certificates"]:
        if entry.get("revoked_at") and dt.datetime.fromisoformat(entry["not_after"]) > now:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"]))
                .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"]))
                .build()
            )
    crl = builder.sign(ca_key, hashes.SHA256())
    index["crl_number"] = number
    _save_index(directory, index)
    path = directory / CRL
    _write(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return path


def _check_client_cn(cn: str) -> None:
    if cn in PRIVILEGED:
        return
    try:
        check_device_id(cn)
    except ProtocolError as exc:
        raise PkiError(f"cannot issue a client certificate for {cn!r}: {exc}") from None


def issue(
    directory: Path,
    cn: str,
    *,
    server: bool = False,
    hosts: tuple[str, ...] = (),
    dest: Path | None = None,
    days: int | None = None,
    any_name: bool = False,
) -> CertPaths:
    """Issue ``<cn>.crt``/``<cn>.key`` signed by the CA in ``directory`` (created if missing),
    written to ``dest`` (default: ``directory``) and recorded in ``issued.json``.

    A client CN must be ``hub``, ``operator`` or an unreserved device id (:class:`PkiError`);
    ``any_name`` lifts that (tests that show the broker refuses such identities anyway)."""
    if not server and not any_name:
        _check_client_cn(cn)
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    lifetime = dt.timedelta(days=days if days is not None else (SERVER_DAYS if server else CLIENT_DAYS))
    serial = x509.random_serial_number()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
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
    index = load_index(directory)
    index["certificates"].append(
        {
            "cn": cn,
            "serial": str(serial),
            "not_after": (now + lifetime).isoformat(),
            "revoked_at": None,
            "server": server,
        }
    )
    _save_index(directory, index)
    if not server:
        _set_revoked(directory, cn, False)  # a device issued again (new hardware, same id)
    return paths


def revoked_cns(directory: Path) -> list[str]:
    path = directory / REVOKED
    return sorted(set(path.read_text().split())) if path.is_file() else []


def _set_revoked(directory: Path, cn: str, revoked: bool) -> None:
    names = set(revoked_cns(directory))
    if (cn in names) == revoked:
        return
    names = names | {cn} if revoked else names - {cn}
    _write(directory / REVOKED, "".join(f"{n}\n" for n in sorted(names)).encode(), 0o644)


def revoke(directory: Path, cn: str, *, keep_serial: int | None = None) -> list[int]:
    """Revoke every unrevoked certificate issued to ``cn`` (but ``keep_serial``) and re-sign the
    CRL; returns the serials revoked. :class:`PkiError` when ``cn`` never had a certificate."""
    index = load_index(directory)
    mine = [e for e in index["certificates"] if e["cn"] == cn]
    if not mine:
        raise PkiError(f"no certificate was issued to {cn!r} by the CA in {directory}")
    now = dt.datetime.now(dt.UTC).isoformat()
    revoked = []
    for entry in mine:
        if not entry.get("revoked_at") and int(entry["serial"]) != keep_serial:
            entry["revoked_at"] = now
            revoked.append(int(entry["serial"]))
    _save_index(directory, index)
    write_crl(directory)
    if keep_serial is None:  # revoked outright (not a rotation): the plugin disconnects the CN too
        _set_revoked(directory, cn, True)
    return revoked


def rotate(
    directory: Path,
    cn: str,
    *,
    dest: Path | None = None,
    days: int | None = None,
    keep_previous: bool = False,
) -> tuple[CertPaths, list[int]]:
    """A new key and certificate for ``cn``; unless ``keep_previous``, every older certificate of
    ``cn`` is revoked at once (CRL re-signed). Returns the new files and the serials revoked."""
    if not any(e["cn"] == cn for e in load_index(directory)["certificates"]):
        raise PkiError(f"no certificate was issued to {cn!r} by the CA in {directory}")
    paths = issue(directory, cn, dest=dest, days=days)
    if keep_previous:
        return paths, []
    serial = x509.load_pem_x509_certificate(paths.cert.read_bytes()).serial_number
    return paths, revoke(directory, cn, keep_serial=serial)


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


__all__ = [
    "CA_DAYS",
    "CLIENT_DAYS",
    "CRL_DAYS",
    "CertPaths",
    "PkiError",
    "SERVER_DAYS",
    "ensure_ca",
    "issue",
    "load_index",
    "main",
    "make_test_pki",
    "revoke",
    "revoked_cns",
    "rotate",
    "write_crl",
]

if __name__ == "__main__":
    raise SystemExit(main())
