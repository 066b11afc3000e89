"""Each socket-server limit, provoked against a real daemon, moves its ``/metrics`` counter by exactly
the expected amount, and no other limit counter moves.

The daemon (no model) has short limits, like tests/fuzz/conftest.py's, but a 2 s header timeout
so that the connections a case holds open are closed by the test, not by the idle timer, even on
a loaded machine; and an inline access policy under which ``GET /v1/models`` is limited to
2 requests per minute (everything else this test calls is unlimited) and a completion to
``max_tokens`` 1000.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon import Daemon, running_daemon, uds_client
from tests.fuzz.conftest import FUZZ_ENV
from tests.fuzz.rawhttp import (
    assert_json_error,
    connect,
    exchange,
    parse_responses,
    read_until_closed,
    request,
    slow_loris,
)

MAX_CONNECTIONS = 16
RATE_PER_MINUTE = 2
ROLE_MAX_TOKENS = 1000
DEFAULT_MAX_TOKENS = 2000
"""Above the role's limit: a body that never arrives or does not parse must still be named for what
it is (408, 400), not refused for the default max_tokens the guard would otherwise assume."""
FORTY_HEADERS = b"".join(b"X-%d: v\r\n" % i for i in range(40))

Key = tuple[str, frozenset[tuple[str, str]]]
LIMIT_FAMILIES = (
    "edge_agent_connections_refused_total",
    "edge_agent_request_timeouts_total",
    "edge_agent_requests_rejected_total",
    "edge_agent_requests_throttled_total",
)


def key(name: str, **labels: str) -> Key:
    return name, frozenset(labels.items())


def refused(reason: str) -> Key:
    return key("edge_agent_connections_refused_total", reason=reason)


def timeout(phase: str) -> Key:
    return key("edge_agent_request_timeouts_total", phase=phase)


def rejected(status: str) -> Key:
    return key("edge_agent_requests_rejected_total", status=status)


def throttled(reason: str) -> Key:
    return key("edge_agent_requests_throttled_total", reason=reason)


def answered(route: str, method: str, status: str) -> Key:
    return key("edge_agent_requests_total", route=route, method=method, status=status, model="-")


@pytest.fixture(scope="module")
def limits_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    uid = os.geteuid()
    ops = ["infer", "embed", "status", "models.admin", "audit.read"]  # not models.list, not admin
    env = {
        **FUZZ_ENV,
        "EDGE_AGENT_SERVER__HEADER_TIMEOUT_S": "2",
        "EDGE_AGENT_ENGINE__DEFAULT_MAX_TOKENS": str(DEFAULT_MAX_TOKENS),
        "EDGE_AGENT_ACCESS__ROLES": json.dumps(
            {
                "ops": {"permissions": [{"actions": ops}], "limits": {"max_tokens": ROLE_MAX_TOKENS}},
                "lister": {
                    "permissions": [{"actions": ["models.list"]}],
                    "limits": {"requests_per_minute": RATE_PER_MINUTE},
                },
            }
        ),
        "EDGE_AGENT_ACCESS__BINDINGS": json.dumps(
            [{"role": "ops", "uids": [uid]}, {"role": "lister", "uids": [uid]}]
        ),
    }
    with running_daemon(tmp_path_factory.mktemp("limit-metrics"), None, env=env, wait=False) as d:
        d.wait_ready(status="no_model")
        yield d


def scrape(daemon: Daemon) -> dict[Key, float]:
    with uds_client(daemon.socket, timeout=10) as c:
        r = c.get("/metrics")
    assert r.status_code == 200, r.text
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out[key(sample.name, **sample.labels)] = sample.value
    return out


def settled(daemon: Daemon, timeout_s: float = 10.0) -> dict[Key, float]:
    """A scrape taken once every other connection has closed (the scrape's own is the one open)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(daemon)
        if samples[key("edge_agent_connections_open")] == 1 or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


# -- the provocations ----------------------------------------------------------------------------


def send_raw(raw: bytes, status: int) -> Callable[[Daemon], None]:
    def provoke(daemon: Daemon) -> None:
        responses, ending = exchange(daemon.socket, raw, timeout=5)
        assert responses, f"no response (connection {ending})"
        assert_json_error(responses[0], status)

    return provoke


def slow_headers(daemon: Daemon) -> None:
    responses, _ = slow_loris(daemon.socket, give_up_s=6)
    assert [r.status for r in responses] == [408]


def slow_body(daemon: Daemon) -> None:
    with connect(daemon.socket) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 400\r\n\r\n{")
        for _ in range(30):
            try:
                sock.send(b"a")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.1)
        data, _ = read_until_closed(sock, timeout=5)
    assert [r.status for r in parse_responses(data)] == [408]


def silent(daemon: Daemon) -> None:
    with connect(daemon.socket) as sock:
        assert read_until_closed(sock, timeout=6) == (b"", "closed")


def never_reads(daemon: Daemon) -> None:
    stuck = connect(daemon.socket)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        stuck.sendall(request("GET", "/openapi.json", close=False) * 400)
        time.sleep(2.5)  # write_timeout_s is 1 s
        data, ending = read_until_closed(stuck, timeout=10)
    finally:
        stuck.close()
    assert ending in {"closed", "reset"}
    assert 0 < len(parse_responses(data, at_eof=False)) < 400


def hold_then(held: int, probe: Callable[[Path], None]) -> Callable[[Daemon], None]:
    """Hold ``held`` silent connections open while ``probe`` connects once more; then close them."""

    def provoke(daemon: Daemon) -> None:
        sockets = [connect(daemon.socket) for _ in range(held)]
        try:
            time.sleep(0.1)
            probe(daemon.socket)
        finally:
            for sock in sockets:
                sock.close()

    return provoke


def answered_503(path: Path) -> None:
    responses, _ = exchange(path, request("GET", "/health"), timeout=5)
    assert assert_json_error(responses[0], 503)["code"] == "too_many_connections"


def closed_unread(path: Path) -> None:
    with connect(path) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request("GET", "/health"))
        assert read_until_closed(sock, timeout=5)[0] == b""


def over_rate(daemon: Daemon) -> None:
    with uds_client(daemon.socket, timeout=10) as c:
        statuses = [c.get("/v1/models") for _ in range(RATE_PER_MINUTE + 1)]
    assert [r.status_code for r in statuses] == [200] * RATE_PER_MINUTE + [429]
    assert statuses[-1].json()["error"]["code"] == "rate_limit_exceeded"


CASES = [
    pytest.param(send_raw(b"GARBAGE\r\n\r\n", 400), {rejected("400"): 1}, id="malformed-request-line"),
    pytest.param(
        send_raw(b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"v" * 5000 + b"\r\n\r\n", 431),
        {rejected("431"): 1},
        id="header-too-long",
    ),
    pytest.param(
        send_raw(b"GET /health HTTP/1.1\r\nHost: x\r\n" + FORTY_HEADERS + b"\r\n", 431),
        {rejected("431"): 1},
        id="too-many-headers",
    ),
    pytest.param(
        send_raw(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
        {rejected("414"): 1},
        id="request-line-too-long",
    ),
    pytest.param(
        send_raw(request("POST", "/v1/completions", b"{}", headers={"Expect": "telepathy"}), 417),
        {rejected("417"): 1},
        id="unknown-expect",
    ),
    pytest.param(slow_headers, {timeout("headers"): 1}, id="slow-headers"),
    pytest.param(
        slow_body,
        {timeout("body"): 1, answered("/v1/completions", "POST", "408"): 1},
        id="slow-body",
    ),
    pytest.param(silent, {timeout("idle"): 1}, id="silent-connection"),
    pytest.param(never_reads, {timeout("write"): 1}, id="client-stops-reading"),
    pytest.param(
        hold_then(MAX_CONNECTIONS, answered_503), {refused("over_limit"): 1}, id="over-connection-limit"
    ),
    pytest.param(
        hold_then(2 * MAX_CONNECTIONS, closed_unread),
        {refused("over_limit"): MAX_CONNECTIONS, refused("dropped"): 1},
        id="far-over-connection-limit",
    ),
    pytest.param(
        over_rate,
        {throttled("rate_limit"): 1, answered("/v1/models", "GET", "429"): 1},
        id="rate-limit",
    ),
]


@pytest.mark.parametrize(("provoke", "expected"), CASES)
def test_limit_moves_its_counter_by_exactly_one_step(
    limits_daemon: Daemon, provoke: Callable[[Daemon], None], expected: dict[Key, int]
) -> None:
    before = settled(limits_daemon)
    provoke(limits_daemon)
    after = settled(limits_daemon)
    watched = {k for k in after if k[0] in LIMIT_FAMILIES} | set(expected)
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in watched}
    assert {k: v for k, v in moved.items() if v} == expected
    assert after[key("edge_agent_connections_open")] == 1  # only the scrape's own connection
    assert after[key("edge_agent_connections_limit")] == MAX_CONNECTIONS


def test_every_limit_series_is_exported_at_zero_from_the_start(tmp_path: Path) -> None:
    with running_daemon(tmp_path / "fresh", None, env=FUZZ_ENV, wait=False) as d:
        d.wait_ready(status="no_model")
        samples = scrape(d)
    limit_series = {k: v for k, v in samples.items() if k[0] in LIMIT_FAMILIES}
    assert limit_series == {  # every label value is there at zero, and no other
        **{refused(r): 0 for r in ("over_limit", "dropped")},
        **{timeout(p): 0 for p in ("idle", "headers", "body", "write")},
        **{rejected(s): 0 for s in ("400", "414", "417", "431", "500", "other")},
        **{throttled(r): 0 for r in ("rate_limit", "queue_full")},
    }


def _queue_depth(daemon: Daemon) -> int:
    with uds_client(daemon.socket, timeout=10) as c:
        return sum(int(m["queue_depth"]) for m in c.get("/admin/status").json()["models"])


@pytest.mark.model
def test_full_queue_moves_the_queue_full_counter(tmp_path: Path, gemma_path: Path) -> None:
    """One slot and one place in the queue: a third request is a 429 counted as ``queue_full``."""
    env = {
        "EDGE_AGENT_ENGINE__N_PARALLEL": "1",
        "EDGE_AGENT_ENGINE__MAX_QUEUE": "1",
        "EDGE_AGENT_ENGINE__N_THREADS": "2",
    }
    long = {"prompt": "Once upon a time", "max_tokens": 1500, "stream": True, "temperature": 0}
    short = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
    with running_daemon(tmp_path / "queue", gemma_path, env=env) as d:
        before = settled(d)
        with (
            uds_client(d.socket) as first,
            uds_client(d.socket) as second,
            concurrent.futures.ThreadPoolExecutor(1) as pool,
        ):
            with first.stream("POST", "/v1/completions", json=long) as running:
                assert running.status_code == 200
                waiter = pool.submit(second.post, "/v1/completions", json=short)
                deadline = time.monotonic() + 30
                while _queue_depth(d) < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
                with uds_client(d.socket) as third:
                    refused = third.post("/v1/completions", json=short)
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"]["code"] == "overloaded"
            assert waiter.result(timeout=120).status_code == 200  # the stream's slot was freed
        after = settled(d)
    expected = {throttled("queue_full"): 1, answered("/v1/completions", "POST", "429"): 1}
    watched = {k for k in after if k[0] in LIMIT_FAMILIES} | set(expected)
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in watched}
    assert {k: v for k, v in moved.items() if v} == expected


@pytest.mark.parametrize(
    "max_tokens",
    [pytest.param(5000, id="integer"), pytest.param(5000.0, id="integer-written-as-float")],
)
def test_role_token_limit_holds_however_the_integer_is_written(
    limits_daemon: Daemon, max_tokens: float
) -> None:
    """The handler takes ``5000.0`` as 5000, so the access guard must too (else it checks the default)."""
    with uds_client(limits_daemon.socket, timeout=10) as c:
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": max_tokens})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("max_tokens_limit", "max_tokens")
    assert f"max_tokens 5000 exceeds the limit {ROLE_MAX_TOKENS}" in error["message"]


@pytest.mark.parametrize(
    ("body", "status"),
    [
        pytest.param(b"{not json", 400, id="malformed-json"),
        pytest.param(b"[1, 2]", 400, id="not-an-object"),
    ],
)
def test_a_bad_body_is_named_not_taken_for_the_default_max_tokens(
    limits_daemon: Daemon, body: bytes, status: int
) -> None:
    """Under a role limit below ``default_max_tokens``, an unreadable body is refused for what it is."""
    assert ROLE_MAX_TOKENS < DEFAULT_MAX_TOKENS
    with uds_client(limits_daemon.socket, timeout=10) as c:
        r = c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] != "max_tokens_limit"
    assert "max_tokens" not in r.json()["error"]["message"]
