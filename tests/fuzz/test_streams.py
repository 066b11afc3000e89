"""Streaming clients that misbehave, with the real model: they go away, or read very slowly.

A client that disconnects mid-stream or while queued must free its generation slot (``queue_depth``
back to 0 in /admin/status) and its file descriptor; a client that reads one small piece at a time
still gets the whole stream, and does not hold up anyone else.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.daemon import Daemon, uds_client
from tests.fuzz.rawhttp import connect, parse_responses, read_until_closed, request
from tests.load.procstats import fd_count, settle

pytestmark = pytest.mark.model


def _stream_request(
    max_tokens: int, close: bool = True, prompt: str = "Write a long story about an edge box:"
) -> bytes:
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0.7, "seed": 1}
    return request("POST", "/v1/completions", json.dumps(body).encode(), close=close)


def _queue_depth(daemon: Daemon) -> int:
    with uds_client(daemon.socket, timeout=10) as c:
        return sum(m["queue_depth"] for m in c.get("/admin/status").json()["models"])


def _wait_idle(daemon: Daemon, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    depth = _queue_depth(daemon)
    while depth and time.monotonic() < deadline:
        time.sleep(0.05)
        depth = _queue_depth(daemon)
    return depth


def _events(body: bytes) -> list[str]:
    return [line[len("data: ") :] for line in body.decode().split("\n\n") if line.startswith("data: ")]


@pytest.fixture(scope="module")
def baseline_fds(model_daemon: Daemon) -> int:
    with uds_client(model_daemon.socket) as c:
        assert c.post("/v1/completions", json={"prompt": "warm up", "max_tokens": 2}).status_code == 200
    assert _wait_idle(model_daemon) == 0
    return fd_count(model_daemon.proc.pid)


def test_disconnect_mid_stream_frees_the_slot(model_daemon: Daemon, baseline_fds: int) -> None:
    for _ in range(6):
        with connect(model_daemon.socket) as sock:
            sock.sendall(_stream_request(400))
            first = sock.recv(4096)
            assert first.startswith(b"HTTP/1.1 200"), first[:200]
            # gone, with the generation still running
    assert _wait_idle(model_daemon) == 0
    with uds_client(model_daemon.socket) as c:
        r = c.post("/v1/completions", json={"prompt": "After the storm", "max_tokens": 3})
    assert r.status_code == 200
    assert settle(lambda: fd_count(model_daemon.proc.pid), baseline_fds) <= baseline_fds


def test_disconnect_while_queued_frees_the_slot(model_daemon: Daemon, baseline_fds: int) -> None:
    socks = [connect(model_daemon.socket) for _ in range(10)]
    for sock in socks:
        sock.sendall(_stream_request(200))
    time.sleep(0.3)
    for sock in socks:
        sock.close()
    assert _wait_idle(model_daemon) == 0
    assert settle(lambda: fd_count(model_daemon.proc.pid), baseline_fds) <= baseline_fds


def test_very_slow_reader_gets_the_whole_stream_without_blocking_others(model_daemon: Daemon) -> None:
    other: dict[str, float] = {}

    def meanwhile() -> None:
        time.sleep(0.3)
        start = time.monotonic()
        with uds_client(model_daemon.socket) as c:
            r = c.post("/v1/completions", json={"prompt": "Meanwhile,", "max_tokens": 3})
        other["status"] = r.status_code
        other["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=meanwhile)
    with connect(model_daemon.socket, timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        sock.sendall(_stream_request(48))
        thread.start()
        data = b""
        deadline = time.monotonic() + 30
        while not data.endswith(b"\r\n0\r\n\r\n") and time.monotonic() < deadline:
            chunk = sock.recv(16)
            if not chunk:
                break
            data += chunk
            time.sleep(0.005)
        rest, _ = read_until_closed(sock, timeout=5)
        data += rest
    thread.join(timeout=30)
    responses = parse_responses(data)
    assert [r.status for r in responses] == [200]
    events = _events(responses[0].body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in {"length", "stop"}
    assert all(c["object"] == "text_completion" for c in chunks)
    assert other.get("status") == 200, other
    assert _wait_idle(model_daemon) == 0


def test_pipelined_streams_are_answered_in_order(model_daemon: Daemon) -> None:
    raw = _stream_request(3, close=False, prompt="One") + _stream_request(3, prompt="Two")
    with connect(model_daemon.socket, timeout=30) as sock:
        sock.sendall(raw)
        data, ending = read_until_closed(sock, timeout=30)
    responses = parse_responses(data)
    assert [r.status for r in responses] == [200, 200]
    assert all(_events(r.body)[-1] == "[DONE]" for r in responses)
    assert ending == "closed"


def test_stream_refusal_is_a_plain_json_error(model_daemon: Daemon) -> None:
    body = {"prompt": "word " * 3000, "max_tokens": 4, "stream": True}
    with uds_client(model_daemon.socket) as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "context_length_exceeded"
