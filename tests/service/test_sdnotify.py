"""The sd_notify protocol against a real AF_UNIX datagram socket bound by the test."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.daemon import sdnotify


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        yield str(path), sock
    finally:
        sock.close()


def _recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_status_stopping_lines(receiver: tuple[str, socket.socket]) -> None:
    address, sock = receiver
    notifier = sdnotify.notifier_from_env({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert sdnotify.ready(notifier, "accepting")
    assert _recv(sock) == ["READY=1", "STATUS=accepting", f"MAINPID={os.getpid()}"]
    assert sdnotify.status(notifier, "serving\nREADY=1 injected")
    assert _recv(sock) == ["STATUS=serving READY=1 injected"]  # a value cannot add a line
    assert sdnotify.stopping(notifier)
    assert _recv(sock) == ["STOPPING=1", "STATUS=stopping"]


def test_abstract_namespace_address() -> None:
    name = f"edge-agent-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        notifier = sdnotify.notifier_from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.send("WATCHDOG=1")
        assert _recv(sock) == ["WATCHDOG=1"]
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        pytest.param({}, False, id="not-under-systemd"),
        pytest.param({"NOTIFY_SOCKET": ""}, False, id="empty"),
        pytest.param({"NOTIFY_SOCKET": "relative/path.sock"}, False, id="relative-path-refused"),
    ],
)
def test_no_notify_socket_is_a_null_notifier(env: dict[str, str], enabled: bool) -> None:
    notifier = sdnotify.notifier_from_env(env)
    assert notifier.enabled is enabled
    assert notifier.send("READY=1") is False


def test_vanished_socket_does_not_raise(tmp_path: Path) -> None:
    notifier = sdnotify.notifier_from_env({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.send("READY=1") is False
    assert notifier.send("WATCHDOG=1") is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, None, id="no-watchdog"),
        pytest.param({"WATCHDOG_USEC": "30000000"}, 15.0, id="half-of-usec"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0, id="own-pid"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None, id="other-pid"),
        pytest.param({"WATCHDOG_USEC": "soon"}, None, id="not-a-number"),
        pytest.param({"WATCHDOG_USEC": "0"}, None, id="zero"),
        pytest.param({"WATCHDOG_USEC": "-5"}, None, id="negative"),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert sdnotify.watchdog_interval(env, pid=4242) == expected


def test_watchdog_pings_from_the_loop_and_stops_when_unhealthy(receiver: tuple[str, socket.socket]) -> None:
    address, sock = receiver
    healthy = [True]
    notifier = sdnotify.notifier_from_env({"NOTIFY_SOCKET": address})
    dog = sdnotify.Watchdog(notifier, 0.02, healthy=lambda: healthy[0])

    async def run() -> None:
        task = asyncio.create_task(dog.run())
        while dog.pings < 3:
            await asyncio.sleep(0.01)
        healthy[0] = False
        while dog.skipped < 2:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(run(), 10))  # bounded: a broken watchdog fails, never hangs
    received = []
    sock.settimeout(0.2)
    while True:
        try:
            received.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    assert received and set(received) == {"WATCHDOG=1"}
    assert len(received) == dog.pings


def test_watchdog_rejects_a_zero_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        sdnotify.Watchdog(sdnotify.NullNotifier(), 0)


def test_service_notifier_lifecycle_keeps_pinging_while_draining(receiver: tuple[str, socket.socket]) -> None:
    address, sock = receiver

    async def main() -> sdnotify.ServiceNotifier:
        # The API socket is "closed" (unhealthy) from the start: no pings until STOPPING=1, when
        # closing it is expected and the pings must go on while requests drain.
        service = sdnotify.ServiceNotifier(sdnotify.SocketNotifier(address), 0.02, healthy=lambda: False)

        async def later() -> str:
            return "serving m"

        service.start("accepting; loading m", later)
        assert service.watchdog is not None
        while service.watchdog.skipped < 2:
            await asyncio.sleep(0.01)
        service.stopping()
        while service.watchdog.pings < 2:
            await asyncio.sleep(0.01)
        await service.close()
        return service

    service = asyncio.run(main())
    sock.settimeout(0.3)
    received = []
    while True:
        try:
            received.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    assert received[0].startswith("READY=1\nSTATUS=accepting; loading m")
    assert "STATUS=serving m" in received
    stop = received.index("STOPPING=1\nSTATUS=stopping: draining requests")
    assert "WATCHDOG=1" not in received[:stop]
    assert received[stop + 1 :].count("WATCHDOG=1") == service.watchdog.pings >= 2  # type: ignore[union-attr]
