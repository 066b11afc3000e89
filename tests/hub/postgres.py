"""A real PostgreSQL for the tests: a private cluster (``initdb`` / ``pg_ctl`` of the Debian package)
in a temporary directory, listening on a unix socket in that directory and a free loopback port.

PostgreSQL refuses to run as root: run as root (CI), the cluster belongs to user ``nobody`` and is
started through ``runuser``; otherwise it runs as the test user. Trust authentication for the
superuser ``edge`` on the socket only (nothing else can reach the directory). Each test gets a
fresh database (:meth:`Postgres.new_database`), so tests share one cluster but never data.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.sync.broker import free_port

BIN_DIRS = tuple(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
USER = "edge"


def pg_bin(name: str) -> Path | None:
    for d in BIN_DIRS:
        if (d / name).is_file():
            return d / name
    found = shutil.which(name)
    return Path(found) if found else None


def available() -> bool:
    return all(pg_bin(n) is not None for n in ("initdb", "pg_ctl"))


@dataclass
class Postgres:
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="edge-pg-")))
    port: int = field(default_factory=free_port)
    fsync: bool = False
    """off for the tests (speed), on for benchmarks (as in production)"""
    _names: itertools.count[int] = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", "nobody", "--", *argv] if os.geteuid() == 0 else argv

    def start(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "nobody")
            shutil.chown(self.socket_dir, "nobody")
        subprocess.run(
            self._as_owner(
                [
                    str(pg_bin("initdb")),
                    "-D",
                    str(self.data),
                    "-U",
                    USER,
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        self.pg_ctl("start", "-w", "-t", "60", "-l", str(self.root / "log"))

    def pg_ctl(self, *args: str) -> None:
        opts = f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1"
        opts += "" if self.fsync else " -c fsync=off"
        opts += " -c max_connections=200"
        subprocess.run(
            self._as_owner([str(pg_bin("pg_ctl")), "-D", str(self.data), "-o", opts, *args]),
            check=True,
            capture_output=True,
            timeout=120,
        )

    def restart(self) -> None:
        self.pg_ctl("restart", "-w", "-m", "fast", "-t", "60", "-l", str(self.root / "log"))

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self.pg_ctl("stop", "-w", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


__all__ = ["Postgres", "available", "pg_bin"]
