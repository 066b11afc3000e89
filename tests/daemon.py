"""Start the real ``edge-agent run`` as a subprocess on a temporary state directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx


def uds_client(socket_path: Path, timeout: float = 120.0) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://localhost", timeout=timeout
    )


def openai_client(socket_path: Path) -> Any:
    import openai

    return openai.OpenAI(
        base_url="http://localhost/v1",
        api_key="unused",
        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=120.0),
        max_retries=0,
    )


def accepts(path: Path) -> bool:
    """A raw connect probe (httpx leaks a socket when a UDS connect fails)."""
    import socket

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], state_dir: Path, log_path: Path) -> None:
        self.proc = proc
        self.state_dir = state_dir
        self.socket = state_dir / "run" / "edge-agent.sock"
        self.log_path = log_path

    def log_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def health(self) -> dict[str, Any]:
        with uds_client(self.socket, timeout=5) as c:
            r = c.get("/health")
            return r.json()  # type: ignore[no-any-return]

    def wait_ready(self, timeout: float = 120.0, status: str = "ok") -> None:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}"
                )
            if not accepts(self.socket):
                time.sleep(0.05)
                continue
            try:
                last = self.health()
                if last.get("status") == status:
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"daemon not {status} after {timeout}s (last health {last})")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@contextmanager
def running_daemon(
    state_dir: Path, model_path: Path | None, env: dict[str, str] | None = None, wait: bool = True
) -> Iterator[Daemon]:
    state_dir.mkdir(parents=True, exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    full_env.update(
        {
            "EDGE_AGENT_STATE_DIR": str(state_dir),
            "EDGE_AGENT_LOG__FORMAT": "json",
            "EDGE_AGENT_ENGINE__N_CTX": "2048",
            # tests compare outputs across runs: the reproducible mode unless a test asks for fast
            "EDGE_AGENT_ENGINE__BATCH_INVARIANT": "true",
        }
    )
    if model_path is not None:
        full_env["EDGE_AGENT_MODEL__PATH"] = str(model_path)
    full_env.update(env or {})
    log_path = state_dir / "daemon.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run"], stdout=log, stderr=subprocess.STDOUT, env=full_env
        )
    daemon = Daemon(proc, state_dir, log_path)
    try:
        if wait:
            daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


@contextmanager
def demo_daemon(state_dir: Path, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    """``make run`` in miniature: the signed demo store (Gemma the default for completions,
    SmolLM2-135M-Instruct for chat, MiniLM for embeddings) built into ``state_dir`` and served."""
    from agent.demo import build_demo_store
    from tests.conftest import MODEL_CACHE

    build_demo_store(state_dir, out=lambda _: None, sources=MODEL_CACHE)
    with running_daemon(state_dir, None, env={"EDGE_AGENT_ENGINE__N_THREADS": "2", **(env or {})}) as daemon:
        yield daemon
