"""A real Mosquitto for the sync tests: TLS with client certificates and the repo's ACL.

The config is ``mosquitto/mosquitto.conf`` rendered with a free loopback port, the certificate
directory, the ACL file and the plugin ``mosquitto/edge_acl.c`` (built by
``mosquitto/build-plugin.sh`` once per source version, cached under ``~/.cache/edge-agent``); the
certificates are generated per test session by :mod:`hub.sync.certs`.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fleet.messages import Outgoing
from fleet.mqtt import MqttConfig

REPO = Path(__file__).resolve().parents[2]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
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
    """One mosquitto process; ``restart()`` keeps the port so clients reconnect to it."""

    workdir: Path
    certdir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    extra: str = ""
    """lines appended to the rendered config (a test's own settings, e.g. ``crlfile``)"""

    def config_path(self) -> Path:
        template = (REPO / "mosquitto" / "mosquitto.conf").read_text()
        conf = template.replace("{port}", str(self.port)).replace("{certdir}", str(self.certdir))
        conf = conf.replace("{acl}", str(REPO / "mosquitto" / "acl")).replace(
            "{persistence}", str(self.workdir)
        )
        conf = conf.replace("{plugin}", str(plugin_path()))
        conf += self.extra
        # Run as the test user: the certificates live in the user's private temp directory.
        conf += f"\nuser {getpass.getuser()}\n"
        path = self.workdir / "mosquitto.conf"
        path.write_text(conf)
        return path

    def start(self) -> None:
        log = (self.workdir / "mosquitto.log").open("ab")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.config_path())], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        ctx = ssl.create_default_context(cafile=str(self.certdir / "ca.crt"))
        ctx.load_cert_chain(str(self.certdir / "operator.crt"), str(self.certdir / "operator.key"))
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {(self.workdir / 'mosquitto.log').read_text()}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1"),
                ):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

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
        if cn == "hub":  # hub workers: short sessions (see hub.sync.commands.HUB_SESSION_EXPIRY_S)
            kw.setdefault("session_expiry_s", 120)
        return MqttConfig(
            host="127.0.0.1",
            port=self.port,
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
