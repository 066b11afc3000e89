"""The real daemon speaks sd_notify to a notify socket the test binds, as systemd would."""

from __future__ import annotations

import signal
from datetime import datetime
from pathlib import Path

import pytest

from tests.daemon import running_daemon, uds_client
from tests.service.conftest import NotifyListener

pytestmark = pytest.mark.model

WATCHDOG_USEC = 400_000  # pings every 0.2 s


def _log_time(line: dict[str, object]) -> float:
    return datetime.fromisoformat(str(line["timestamp"]).replace("Z", "+00:00")).timestamp()


def test_ready_before_model_loaded_watchdog_and_stopping(
    tmp_path: Path, gemma_path: Path, notify_listener: NotifyListener
) -> None:
    env = {"NOTIFY_SOCKET": str(notify_listener.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    with running_daemon(tmp_path / "state", gemma_path, env=env, wait=False) as d:
        try:
            ready = notify_listener.wait_for("READY", "1", timeout=30)
        except TimeoutError:
            raise AssertionError(f"exit {d.proc.poll()}: {d.log_path.read_text()[-3000:]}") from None
        assert ready.get("MAINPID") == str(d.proc.pid)
        assert "loading" in str(ready.get("STATUS"))
        # The API socket accepts as soon as READY=1 has been sent.
        with uds_client(d.socket, timeout=10) as c:
            health = c.get("/health").json()
        assert health["status"] in ("loading", "ok")
        d.wait_ready()
        serving = notify_listener.wait_for("STATUS", "serving gemma-3-270m-q4_k_m")
        loaded = [line for line in d.log_lines() if line.get("event") == "model_ready"]
        assert len(loaded) == 1
        # READY=1 came before the model had loaded; the later STATUS line after it.
        assert ready.at <= _log_time(loaded[0]) <= serving.at + 1.0
        first = notify_listener.wait_for("WATCHDOG", "1")
        later = notify_listener.wait_for("WATCHDOG", "1", count=len(notify_listener.with_key("WATCHDOG")) + 3)
        assert later.at > first.at
        d.proc.send_signal(signal.SIGTERM)
        stopping = notify_listener.wait_for("STOPPING", "1")
        assert d.proc.wait(timeout=30) == 0
    assert stopping.at > ready.at
    assert "stopping" in str(stopping.get("STATUS"))


def test_watchdog_meant_for_another_process_is_ignored(
    tmp_path: Path, notify_listener: NotifyListener
) -> None:
    env = {
        "NOTIFY_SOCKET": str(notify_listener.path),
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "WATCHDOG_PID": "1",
    }
    with running_daemon(tmp_path / "state", None, env=env, wait=False) as d:
        notify_listener.wait_for("READY", "1")
        d.wait_ready(status="no_model")
        with uds_client(d.socket, timeout=10) as c:  # a request round-trip: the loop has run for a while
            c.get("/health")
        assert notify_listener.with_key("WATCHDOG") == []
