"""nginx from Debian as a real HTTP(S) mirror of a repository's ``targets/`` tree, for the tests.

One foreground nginx (``master_process off``: a single process owned by the test, no user
switch) on a loopback port, serving a directory the test fills (a copy of ``<repo>/targets``,
possibly with a corrupted byte). ``tls=True`` serves HTTPS with a certificate for 127.0.0.1 made
by :func:`make_server_cert`. Skipped with a reason when nginx is not installed (CI installs it:
scripts/system-deps.sh).
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import socket
import subprocess
import time
from pathlib import Path

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {work}/access.log;
    client_body_temp_path {work}/body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    types {{ application/octet-stream gguf; }}
    default_type application/octet-stream;
    sendfile on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port}{ssl};
        {tls}
        root {root};
        location / {{ }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_server_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA): (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    _LOOPBACK = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test mirror")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "mirror.crt", directory / "mirror.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


class Nginx:
    """``start()`` / ``stop()``; ``url`` is the base a device lists as a mirror."""

    def __init__(self, work: Path, root: Path, *, tls: bool = False) -> None:
        assert NGINX is not None
        self.work = work
        self.root = root
        self.port = free_port()
        self.tls = tls
        self.cert: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/"

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.root.mkdir(parents=True, exist_ok=True)
        tls = ""
        if self.tls:
            self.cert, key = make_server_cert(self.work / "tls")
            tls = f"ssl_certificate {self.cert}; ssl_certificate_key {key};"
        conf = self.work / "nginx.conf"
        conf.write_text(
            _CONF.format(
                work=self.work, port=self.port, root=self.root, ssl=" ssl" if self.tls else "", tls=tls
            )
        )
        self.proc = subprocess.Popen(
            [str(NGINX), "-c", str(conf), "-p", str(self.work), "-e", str(self.work / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                err = (
                    (self.work / "error.log").read_text(errors="replace")
                    if (self.work / "error.log").exists()
                    else ""
                )
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {err[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError("nginx did not listen within 10 s")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def requests_for(self, name_part: str) -> int:
        """Requests in the access log whose line mentions ``name_part`` (e.g. a sha256)."""
        log = self.work / "access.log"
        if not log.exists():
            return 0
        return sum(1 for line in log.read_text(errors="replace").splitlines() if name_part in line)


def mirror_copy(repo_dir: Path, root: Path) -> Path:
    """Copy ``<repo>/targets`` to ``root`` (what an operator rsyncs to a web server)."""
    shutil.copytree(repo_dir / "targets", root, dirs_exist_ok=True)
    return root


def corrupt(root: Path, sha256: str, offset: int) -> Path:
    """Flip one byte at ``offset`` of the mirrored file named by ``sha256``."""
    path = next(p for p in root.rglob(f"{sha256}.*") if p.is_file())
    with path.open("r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0xFF]))
    return path


class SilentServer:
    """A TCP port that accepts connections (kernel backlog) and never answers: a hung mirror."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/"

    def close(self) -> None:
        self.sock.close()


__all__ = ["NGINX", "Nginx", "SilentServer", "corrupt", "free_port", "make_server_cert", "mirror_copy"]
