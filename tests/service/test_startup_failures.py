"""A failure at any start-up step stops exactly what was started before it (agent/daemon/app.py).

Each case runs the real daemon in-process on a temporary state directory; two failures are real
(a bad access policy, a hub certificate that does not exist), the others are injected into one
step. After the failure: the error reached the caller, every part started before it was stopped in
reverse order, the socket file is gone, and the signal handlers are the ones before the start.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from agent.config import Settings
from agent.daemon import app as daemon_app
from agent.errors import ConfigError
from agent.server.http import ApiServer

BEFORE_SERVER = ["signals", "guard", "pool", "socket", "reloader", "sighup", "notifier"]
THROUGH_SERVER = [*BEFORE_SERVER, "server", "stopping"]


def _settings(tmp_path: Path, **extra: Any) -> Settings:
    return Settings(state_dir=tmp_path / "state", service={"notify": False}, **extra)


def _boom(*_: object, **__: object) -> Any:
    raise RuntimeError("injected start-up failure")


async def _boom_async(*_: object, **__: object) -> Any:
    raise RuntimeError("injected start-up failure")


CASES = [
    pytest.param(
        {"access": {"policy_file": "{bad_policy}"}},
        None,
        ConfigError,
        ["signals"],
        id="bad-policy-at-the-guard",
    ),
    pytest.param({}, ("ApiServer.start", _boom_async), RuntimeError, BEFORE_SERVER, id="server-cannot-start"),
    pytest.param({}, ("_start_scheduler", _boom), RuntimeError, THROUGH_SERVER, id="scheduler-fails"),
    pytest.param(
        {
            "hub": {
                "host": "127.0.0.1",
                "device_id": "box-1",
                "ca_file": "/nonexistent/ca.crt",
                "cert_file": "/nonexistent/box.crt",
                "key_file": "/nonexistent/box.key",
            }
        },
        None,
        ConfigError,
        [*THROUGH_SERVER, "scheduler"],
        id="hub-certificate-missing",
    ),
]


@pytest.mark.parametrize(("extra", "inject", "error", "started"), CASES)
def test_a_failed_start_stops_what_it_started(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    extra: dict[str, Any],
    inject: tuple[str, Any] | None,
    error: type[Exception],
    started: list[str],
) -> None:
    if inject is not None:
        name, fn = inject
        if name.startswith("ApiServer."):
            monkeypatch.setattr(ApiServer, name.split(".")[1], fn)
        else:
            monkeypatch.setattr(daemon_app, name, fn)
    bad_policy = tmp_path / "policy.json"
    bad_policy.write_text('{"roles": {"app": {"permissions": [{"actions": ["fly"]}]}}}')
    if "access" in extra:
        extra = {"access": {"policy_file": str(bad_policy)}}
    settings = _settings(tmp_path, **extra)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    daemon = daemon_app.Daemon(settings)
    with pytest.raises(error):
        asyncio.run(daemon.run())
    assert daemon.stopper.stopped == list(reversed(started))
    assert daemon.stopper.started == []
    assert not settings.socket_path.exists()
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_a_clean_stop_runs_every_step_once(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    daemon = daemon_app.Daemon(settings)

    async def main() -> int:
        task = asyncio.create_task(daemon.run())
        while not settings.socket_path.exists():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        daemon.request_stop()
        return await task

    assert asyncio.run(main()) == 0
    assert daemon.stopper.stopped == list(reversed([*THROUGH_SERVER, "scheduler"]))
    assert not settings.socket_path.exists()


def test_a_step_that_overruns_the_deadline_does_not_stop_the_rest() -> None:
    stopper = daemon_app.Stopper()
    ran: list[str] = []

    async def hang() -> None:
        await asyncio.sleep(60)

    def broken() -> None:
        raise OSError("already gone")

    stopper.push("first", lambda: ran.append("first"))
    stopper.push("broken", broken)
    stopper.push("hangs", hang)
    failed = asyncio.run(stopper.stop(deadline_s=0.2))
    assert failed == ["hangs", "broken"]
    assert ran == ["first"]
    assert stopper.stopped == ["hangs", "broken", "first"]
