"""A small fleet PKI for MQTT over TLS: two CAs, the broker's and the clients' certificates,
revocation (``cryptography``).

For tests and for small fleets (``edge-hub certs``, ``edge-hub device issue|rotate|revoke|crl``); a
large fleet may use its own PKI of the same shape (then it must publish CRLs the broker reads the
same way). The client certificate's CN is the MQTT identity the broker enforces
(``use_identity_as_username``): ``hub`` for hub workers, ``operator`` for the CLI, the device id
for a device.

Two CAs, because the broker has two listeners (mosquitto/mosquitto.conf): devices connect to the
device listener, which trusts only ``ca.crt`` and replaces the client id by the CN
(``use_username_as_clientid``), so one device cannot take over another's client id and session;
hub workers and operator tools (several processes per identity, each with its own client id)
connect to the service listener, which trusts only ``service-ca.crt``. ``ca.crt`` also signs the
broker's certificate: every client verifies the broker with ``ca.crt``.

Files in the directory: ``ca.crt``/``ca.key``, ``service-ca.crt``/``service-ca.key``,
``<cn>.crt``/``<cn>.key`` per identity, ``issued.json`` (every certificate issued: CN, serial,
expiry, revocation), ``crl.pem`` and ``service-crl.pem``, the revocation lists of the two CAs the
broker loads (``crlfile`` of each listener; re-read on SIGHUP), and ``revoked.txt``, the CNs
revoked outright, which the broker plugin refuses and disconnects on SIGHUP.

Invariants:
- Keys are ECDSA P-256 (Mosquitto/OpenSSL handle them everywhere); private keys are written with
  mode 0600, atomically; an existing CA is reused, never overwritten, so certificates issued later
  chain to the same root.
- The service identities (:data:`SERVICE_IDENTITIES`) are signed by the service CA and every other
  CN by the device CA, so no device certificate can carry the hub's or the operator's name (which
  the ACL grants everything). A device CN must be a device id that is not reserved (``hub``,
  ``operator``, ``ca``, ``broker``).
- Lifetimes: client certificates :data:`CLIENT_DAYS` (90) days, the broker's :data:`SERVER_DAYS`
  (397), the CAs :data:`CA_DAYS` (5 years). A stolen key is useful until its certificate is
  revoked or expires, whichever comes first.
- A CRL always exists once its CA does (empty at first), because a broker with ``crlfile`` refuses
  every client when the file is missing; it is valid for :data:`CRL_DAYS` (30) days and must be
  re-signed before that (``edge-hub device crl``, also done by every revoke and rotate), else the
  broker refuses every client of that listener. Its CRL number only grows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import sys
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
SERVICE_IDENTITIES = ("hub", "operator")
"""Client CNs that are broker roles, not devices (mosquitto/acl, plugin_opt_privileged), signed by
the service CA."""
PRIVILEGED = SERVICE_IDENTITIES
DEVICE_CA = "ca"
SERVICE_CA = "service-ca"
INDEX = "issued.json"
CRL = "crl.pem"
SERVICE_CRL = "service-crl.pem"
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


def _crl_name(ca: str) -> str:
    return CRL if ca == DEVICE_CA else SERVICE_CRL


def _ca_of(cn: str) -> str:
    return SERVICE_CA if cn in SERVICE_IDENTITIES else DEVICE_CA


def ensure_ca(directory: Path, name: str = DEVICE_CA) -> CertPaths:
    """Create ``<name>.crt``/``<name>.key`` in ``directory`` unless they exist (``ca``: devices and
    the broker; ``service-ca``: hub workers and operator tools), with its empty CRL."""
    if name not in (DEVICE_CA, SERVICE_CA):
        raise ValueError(f"unknown CA {name!r}: {DEVICE_CA} or {SERVICE_CA}")
    cn = "edge-fleet-ca" if name == DEVICE_CA else "edge-fleet-service-ca"
    paths = CertPaths(directory / f"{name}.crt", directory / f"{name}.key")
    if paths.cert.is_file() and paths.key.is_file():
        if not (directory / _crl_name(name)).is_file():  # a CA made before revocation existed
            write_crl(directory, ca=name)
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
    write_crl(directory, ca=name)
    return paths


def _load_ca(directory: Path, name: str = DEVICE_CA) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_paths = ensure_ca(directory, name)
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


def write_crl(directory: Path, *, days: int = CRL_DAYS, ca: str = DEVICE_CA) -> Path:
    """Sign the CRL of CA ``ca`` (``crl.pem`` or ``service-crl.pem``) from the index: every
    certificate of that CA revoked and not expired yet, valid for ``days``, with the next CRL
    number (one counter for both lists). Atomic; returns its path."""
    index = load_index(directory)
    ca_paths = CertPaths(directory / f"{ca}.crt", directory / f"{ca}.key")
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
        if entry.get("server") or _ca_of(entry["cn"]) != ca:
            continue
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
    path = directory / _crl_name(ca)
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
    """Issue ``<cn>.crt``/``<cn>.key`` signed by the right CA in ``directory`` (created if
    missing): the service CA for :data:`SERVICE_IDENTITIES`, the device CA for devices and the
    broker; written to ``dest`` (default: ``directory``) and recorded in ``issued.json``.

    A client CN must be ``hub``, ``operator`` or an unreserved device id (:class:`PkiError`);
    ``any_name`` lifts that (tests that show the broker refuses such identities anyway)."""
    if server and cn in SERVICE_IDENTITIES:
        raise PkiError(f"{cn!r} is a client identity, not a broker name")
    if not server and not any_name:
        _check_client_cn(cn)
    ca_cert, ca_key = _load_ca(directory, DEVICE_CA if server else _ca_of(cn))
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
    write_crl(directory, ca=_ca_of(cn))
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


BROKER_HOSTS = ("localhost", "127.0.0.1")
"""Always in the broker certificate's SANs (a broker tried on one machine); a fleet adds the name
the boxes dial (``[hub] host``) with ``--broker-host``."""


def make_pki(
    directory: Path, clients: tuple[str, ...], broker_hosts: tuple[str, ...] = ()
) -> dict[str, CertPaths]:
    """Both CAs + ``broker`` (:data:`BROKER_HOSTS` and ``broker_hosts`` as SANs) + one client
    certificate per name. The broker certificate is issued anew (its SANs may change); client
    certificates too."""
    for cn in clients:
        _check_client_cn(cn)
    out = {"ca": ensure_ca(directory), "service-ca": ensure_ca(directory, SERVICE_CA)}
    hosts = tuple(dict.fromkeys((*BROKER_HOSTS, *broker_hosts)))
    out["broker"] = issue(directory, "broker", server=True, hosts=hosts)
    for cn in clients:
        out[cn] = issue(directory, cn)
    return out


def make_test_pki(directory: Path, clients: tuple[str, ...]) -> dict[str, CertPaths]:
    """:func:`make_pki` for a broker on this machine."""
    return make_pki(directory, clients)


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
    except PkiError as exc:
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
    "CA_DAYS",
    "CLIENT_DAYS",
    "CRL",
    "CRL_DAYS",
    "REVOKED",
    "SERVER_DAYS",
    "SERVICE_CRL",
    "SERVICE_IDENTITIES",
    "CertPaths",
    "PkiError",
    "add_arguments",
    "ensure_ca",
    "issue",
    "load_index",
    "main",
    "make_pki",
    "make_test_pki",
    "revoke",
    "revoked_cns",
    "rotate",
    "run",
    "write_crl",
]

if __name__ == "__main__":
    raise SystemExit(main())
