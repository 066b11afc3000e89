"""Real ``edge-hub serve`` processes for the tests and benchmarks (several workers, one broker, one
database), started as an operator starts them on several hosts: the same repository, the same
database setting, the hub's certificate, a client id of their own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.sync.broker import Broker

REPO_ROOT = Path(__file__).resolve().parents[2]


def spawn_hub(
    broker: Broker, repo: Path, db: str | Path, client_id: str, log: Path, extra: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """``edge-hub serve`` (``python -m hub.cli serve``, then ``extra`` options) with its log in
    ``log``; the database goes by ``EDGE_HUB_DB`` as an operator would set it."""
    certdir = broker.certdir
    argv = [sys.executable, "-m", "hub.cli", "serve", "--repo", str(repo)]
    argv += ["--host", "127.0.0.1", "--port", str(broker.service_port), "--ca", str(certdir / "ca.crt")]
    argv += ["--cert", str(certdir / "hub.crt"), "--key", str(certdir / "hub.key"), "--client-id", client_id]
    argv += list(extra)
    env = {**os.environ, "EDGE_HUB_DB": str(db), "PYTHONPATH": str(REPO_ROOT)}
    with log.open("ab") as out:
        return subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_serving(proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    """Until the process logs ``hub_serving`` (subscriptions in place); its log when it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"edge-hub serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if log.is_file() and "hub_serving" in log.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise TimeoutError(f"edge-hub serve not serving after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(40)  # a worker leaving hands over what it holds first (--leave-timeout 20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


__all__ = ["spawn_hub", "stop", "wait_serving"]
