"""A real Mosquitto for the sync tests, installed and started exactly as docs/operations.md says.

``edge-hub broker install``'s function lays out the shipped ``mosquitto/mosquitto.conf``,
``mosquitto/acl`` and the plugin ``mosquitto/edge_acl.c`` (built by ``mosquitto/build-plugin.sh``
once per source version, cached under ``~/.cache/edge-agent``) with the session's certificates
(:mod:`hub.sync.certs`) on two free loopback ports, and ``mosquitto -c <dest>/mosquitto.conf``
starts it unchanged: run as root (CI), the broker drops to user ``mosquitto`` and reads its files as
that user, as on a fleet's broker. The layout lives under a directory of its own in the system temp
directory, which that user can search (pytest's own temp directories are private to the test user).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleet.messages import Outgoing
from fleet.mqtt import MqttConfig
from hub.sync.broker import MOSQUITTO, BrokerLayout, install, install_revocation
from hub.sync.certs import SERVICE_IDENTITIES

REPO = Path(__file__).resolve().parents[2]
CLIENTS = ("hub", "operator", "dev-a", "dev-b", "dev-c", "dev-bench")


def plugin_path() -> Path:
    """The broker plugin built from the shipped source (rebuilt when the source changes)."""
    source = REPO / "mosquitto" / "edge_acl.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-agent" / "mosquitto"
    out = cache / f"edge_acl-{digest}.so"
    if not out.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["bash", str(REPO / "mosquitto" / "build-plugin.sh"), str(out)],
            check=True,
            capture_output=True,
        )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Broker:
    """One mosquitto process; ``restart()`` keeps the ports so clients reconnect to them.

    ``workdir`` holds the log; the installed layout (config, certificates, ACL, persistence) is
    created at the first start and removed by :meth:`cleanup`."""

    workdir: Path
    certdir: Path
    port: int
    service_port: int = field(default_factory=lambda: free_port())
    proc: subprocess.Popen[bytes] | None = None
    layout: BrokerLayout | None = None

    def install(self) -> BrokerLayout:
        if self.layout is None:
            dest = Path(tempfile.mkdtemp(prefix="edge-broker-"))
            self.layout = install(
                REPO / "mosquitto",
                self.certdir,
                dest,
                port=self.port,
                service_port=self.service_port,
                plugin=plugin_path(),
            )
        return self.layout

    def install_revocation(self) -> None:
        """``edge-hub broker crl``: the PKI's current CRLs and revoked list, for the next SIGHUP."""
        install_revocation(self.certdir, self.install().certdir)

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def start(self) -> None:
        config = self.install().config
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        ctx = ssl.create_default_context(cafile=str(self.certdir / "ca.crt"))
        ctx.load_cert_chain(str(self.certdir / "operator.crt"), str(self.certdir / "operator.key"))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log_path.read_text()}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.service_port), timeout=0.5) as raw,
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
                ):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def cleanup(self) -> None:
        self.stop()
        if self.layout is not None:
            shutil.rmtree(self.layout.config.parent, ignore_errors=True)
            self.layout = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def client_config(
        self, cn: str, *, client_id: str | None = None, will: Outgoing | None = None, **kw: object
    ) -> MqttConfig:
        """A client of identity ``cn`` on its listener: the service listener for the hub and the
        operator, the device listener for every other CN."""
        if cn == "hub":  # hub workers: short sessions (see hub.sync.commands.HUB_SESSION_EXPIRY_S)
            kw.setdefault("session_expiry_s", 120)
        port = kw.pop("port", self.service_port if cn in SERVICE_IDENTITIES else self.port)
        return MqttConfig(
            host="127.0.0.1",
            port=port,  # type: ignore[arg-type]
            client_id=client_id or cn,
            ca_file=self.certdir / "ca.crt",
            cert_file=self.certdir / f"{cn}.crt",
            key_file=self.certdir / f"{cn}.key",
            will=will,
            backoff_min_s=0.1,
            backoff_max_s=1.0,
            ack_timeout_s=10.0,
            **kw,  # type: ignore[arg-type]
        )


__all__ = ["CLIENTS", "Broker", "free_port", "plugin_path"]
