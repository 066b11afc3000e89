"""SIGTERM while a stream is running: the stream finishes, the socket goes, exit status 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.daemon import accepts, running_daemon, uds_client

pytestmark = pytest.mark.model


def test_sigterm_lets_stream_finish_and_removes_socket(tmp_path: Path, gemma_path: Path) -> None:
    with running_daemon(
        tmp_path / "state", gemma_path, env={"EDGE_AGENT_SERVER__SHUTDOWN_GRACE_S": "60"}
    ) as d:
        chunks: list[dict[str, object]] = []
        done = threading.Event()
        first = threading.Event()

        def consume() -> None:
            with (
                uds_client(d.socket) as c,
                c.stream(
                    "POST",
                    "/v1/completions",
                    json={
                        "prompt": "Once upon a time",
                        "max_tokens": 64,
                        "temperature": 0,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    },
                ) as r,
            ):
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        data = line.removeprefix("data: ")
                        chunks.append({"done": True} if data == "[DONE]" else json.loads(data))
                        first.set()
            done.set()

        t = threading.Thread(target=consume)
        t.start()
        assert first.wait(60)
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # New connections are refused while the stream drains.
        assert not d.socket.exists() or _refused(d.socket)
        assert done.wait(60)
        t.join()
        assert d.proc.wait(timeout=30) == 0
        assert chunks[-1] == {"done": True}
        usage = [c for c in chunks if c.get("usage")]
        assert usage and usage[-1]["usage"]["completion_tokens"] == 64  # type: ignore[index]
        assert not d.socket.exists()
        assert any(line.get("event") == "stopped" for line in d.log_lines())


def _refused(sock: Path) -> bool:
    return not accepts(sock)


def test_sigterm_grace_bound_cuts_long_stream(tmp_path: Path, gemma_path: Path) -> None:
    with running_daemon(
        tmp_path / "state", gemma_path, env={"EDGE_AGENT_SERVER__SHUTDOWN_GRACE_S": "0.5"}
    ) as d:
        started = threading.Event()

        def consume() -> None:
            try:
                with (
                    uds_client(d.socket) as c,
                    c.stream(
                        "POST",
                        "/v1/completions",
                        json={"prompt": "Once upon a time", "max_tokens": 1500, "stream": True},
                    ) as r,
                ):
                    for _ in r.iter_lines():
                        started.set()
            except Exception:
                pass

        t = threading.Thread(target=consume, daemon=True)
        t.start()
        assert started.wait(60)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 15
        assert not d.socket.exists()
