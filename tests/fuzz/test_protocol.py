"""Hostile HTTP over the real socket, without a model: every answer is a JSON error, nothing hangs.

Runs against a real daemon whose limits are small (tests/fuzz/conftest.py): 1 s header, body and
write timeouts, 16 connections, 64 KiB bodies, 4 KiB header lines, 32 headers.
"""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from tests.daemon import Daemon
from tests.fuzz.rawhttp import (
    assert_json_error,
    connect,
    exchange,
    parse_responses,
    read_responses,
    read_until_closed,
    request,
    slow_loris,
)
from tests.load.procstats import fd_count, settle

MAX_CONNECTIONS = 16


def _health_ok(daemon: Daemon) -> None:
    assert daemon.proc.poll() is None, "daemon exited"
    responses, _ = exchange(daemon.socket, request("GET", "/health"))
    assert [r.status for r in responses] == [200]
    assert responses[0].json()["status"] == "no_model"


@pytest.fixture(scope="module", autouse=True)
def baseline_fds(bare_daemon: Daemon) -> int:
    _health_ok(bare_daemon)
    return fd_count(bare_daemon.proc.pid)


HOSTILE = [
    pytest.param(b"GARBAGE\r\n\r\n", 400, id="not-http"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400, id="tls-hello"),
    pytest.param(b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400, id="bad-version"),
    pytest.param(b"GET /health HTTP/1.1\nHost: x\n\n", 400, id="bare-lf"),
    pytest.param(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n", 400, id="no-host"),
    pytest.param(b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", 400, id="non-utf8-path"),
    pytest.param(b"GET /health HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n", 400, id="nul-in-header"),
    pytest.param(
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-" + b"h" * 5000 + b": v\r\n\r\n", 431, id="long-header-name"
    ),
    pytest.param(
        b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"v" * 5000 + b"\r\n\r\n", 431, id="long-header-value"
    ),
    pytest.param(
        b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(40)) + b"\r\n",
        431,
        id="too-many-headers",
    ),
    pytest.param(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, id="long-uri"),
    pytest.param(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", 400, id="bad-length"
    ),
    pytest.param(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}", 400, id="negative-length"
    ),
    pytest.param(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
        id="duplicate-length",
    ),
    pytest.param(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n{}",
        400,
        id="length-and-chunked",
    ),
    pytest.param(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
        400,
        id="bad-chunk-size",
    ),
    pytest.param(
        request("POST", "/v1/completions", b'{"prompt": "x"}', headers={"Content-Encoding": "br"}),
        400,
        id="unknown-content-encoding",
    ),
    pytest.param(
        request("POST", "/v1/completions", b'{"prompt": "x"}', headers={"Expect": "telepathy"}),
        417,
        id="unknown-expect",
    ),
    pytest.param(request("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}'), 400, id="non-utf8-body"),
    pytest.param(request("POST", "/v1/completions", b"{not json"), 400, id="malformed-json"),
    pytest.param(request("POST", "/v1/completions", b""), 400, id="empty-body"),
    pytest.param(request("POST", "/v1/completions", b'"a string"'), 400, id="json-not-object"),
    pytest.param(
        request("POST", "/v1/completions", b"[" * 60_000),
        400,
        id="deeply-nested-json",
    ),
    pytest.param(request("POST", "/v1/completions", b'{"prompt": 5}'), 400, id="wrong-type"),
    pytest.param(
        request("POST", "/v1/completions", b'{"prompt": "' + b"a" * 70_000 + b'"}'), 413, id="body-over-limit"
    ),
    pytest.param(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n{",
        413,
        id="declared-huge-body",
    ),
    pytest.param(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + (b"4000\r\n" + b"a" * 0x4000 + b"\r\n") * 5
        + b"0\r\n\r\n",
        413,
        id="chunked-over-limit",
    ),
    pytest.param(request("DELETE", "/v1/completions"), 405, id="wrong-method"),
    pytest.param(request("GET", "/v1/nothing-here"), 404, id="unknown-route"),
    pytest.param(request("GET", "/%ff%fe"), 404, id="percent-encoded-non-utf8"),
]


@pytest.mark.parametrize(("raw", "status"), HOSTILE)
def test_hostile_request_gets_json_error(bare_daemon: Daemon, raw: bytes, status: int) -> None:
    responses, ending = exchange(bare_daemon.socket, raw, timeout=5)
    assert responses, f"no response (connection {ending})"
    assert_json_error(responses[0], status)
    assert ending in {"closed", "reset"}, "the server closes after an error it cannot recover from"


def test_pipelined_requests_answered_in_order(bare_daemon: Daemon) -> None:
    raw = (
        request("GET", "/health", close=False)
        + request("GET", "/v1/models", close=False)
        + request("POST", "/v1/completions", b"{bad", close=False)
        + request("GET", "/nope")
    )
    responses, ending = exchange(bare_daemon.socket, raw)
    assert [r.status for r in responses] == [200, 200, 400, 404]
    assert responses[1].json() == {"object": "list", "data": []}
    assert_json_error(responses[2], 400)
    assert ending == "closed"


def test_keepalive_connection_turning_to_garbage(bare_daemon: Daemon) -> None:
    with connect(bare_daemon.socket) as sock:
        sock.sendall(request("GET", "/health", close=False))
        first = read_responses(sock)
        sock.sendall(b"NOT HTTP\r\n\r\n")
        data, ending = read_until_closed(sock)
    assert [r.status for r in first] == [200]
    responses = parse_responses(data)
    assert [r.status for r in responses] == [400]
    assert_json_error(responses[0], 400)
    assert ending in {"closed", "reset"}


def test_slow_loris_headers_get_408(bare_daemon: Daemon) -> None:
    start = time.monotonic()
    responses, ending = slow_loris(bare_daemon.socket, give_up_s=4)
    assert [r.status for r in responses] == [408]
    assert assert_json_error(responses[0], 408)["code"] == "request_timeout"
    assert ending in {"closed", "reset"}
    assert time.monotonic() - start < 4.5, "the header timeout (1 s) ended the trickle"


def test_slow_body_gets_408(bare_daemon: Daemon) -> None:
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n"
    start = time.monotonic()
    with connect(bare_daemon.socket) as sock:
        sock.sendall(head + b'{"prompt": "')
        for _ in range(30):
            try:
                sock.send(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
        data, ending = read_until_closed(sock, timeout=5)
    responses = parse_responses(data)
    assert [r.status for r in responses] == [408]
    assert assert_json_error(responses[0], 408)["code"] == "request_timeout"
    assert ending in {"closed", "reset"}
    assert time.monotonic() - start < 5


def test_silent_connection_is_closed(bare_daemon: Daemon) -> None:
    with connect(bare_daemon.socket) as sock:
        data, ending = read_until_closed(sock, timeout=5)
    assert (data, ending) == (b"", "closed")


def test_idle_keepalive_connection_is_not_cut_by_the_header_timer(bare_daemon: Daemon) -> None:
    with connect(bare_daemon.socket) as sock:
        sock.sendall(request("GET", "/health", close=False))
        first = read_responses(sock)
        time.sleep(1.5)  # longer than header_timeout_s: idle between requests is keep-alive's business
        sock.sendall(request("GET", "/v1/models"))
        data, _ = read_until_closed(sock)
    assert [r.status for r in first] == [200]
    assert [r.status for r in parse_responses(data)] == [200]


def test_client_gone_mid_body_leaves_daemon_serving(bare_daemon: Daemon) -> None:
    for _ in range(5):
        with connect(bare_daemon.socket) as sock:
            sock.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{"pro')
    _health_ok(bare_daemon)


def test_connection_limit_answers_503_with_retry_after(bare_daemon: Daemon) -> None:
    held = [connect(bare_daemon.socket) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.1)
        responses, ending = exchange(bare_daemon.socket, request("GET", "/health"), timeout=5)
        error = assert_json_error(responses[0], 503)
        assert error["code"] == "too_many_connections"
        assert ending in {"closed", "reset"}
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    _health_ok(bare_daemon)


def test_far_over_the_limit_is_closed_unread(bare_daemon: Daemon) -> None:
    held = [connect(bare_daemon.socket) for _ in range(2 * MAX_CONNECTIONS)]
    try:
        time.sleep(0.1)
        with connect(bare_daemon.socket) as sock:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(request("GET", "/health"))
            data, ending = read_until_closed(sock, timeout=5)
        assert data == b""
        assert ending in {"closed", "reset"}
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    _health_ok(bare_daemon)


def test_client_that_never_reads_is_aborted_while_others_are_served(bare_daemon: Daemon) -> None:
    stuck = connect(bare_daemon.socket)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        # ~12 KiB per answer, 400 answers: far more than the socket and transport buffers hold.
        stuck.sendall(request("GET", "/openapi.json", close=False) * 400)
        _health_ok(bare_daemon)  # the event loop is not blocked by the stalled writer
        time.sleep(2.5)  # write_timeout_s is 1 s
        data, ending = read_until_closed(stuck, timeout=10)
    finally:
        stuck.close()
    assert ending in {"closed", "reset"}
    assert 0 < len(parse_responses(data, at_eof=False)) < 400
    _health_ok(bare_daemon)


def test_no_descriptor_leaked(bare_daemon: Daemon, baseline_fds: int) -> None:
    """Runs last in this module: after every hostile client above, the daemon holds what it held."""
    for _ in range(20):
        exchange(bare_daemon.socket, b"GARBAGE\r\n\r\n")
    now = settle(lambda: fd_count(bare_daemon.proc.pid), baseline_fds, timeout=5)
    assert now <= baseline_fds, (now, baseline_fds)
    _health_ok(bare_daemon)
