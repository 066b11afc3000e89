"""The pure parts of agent/server/limits.py, and the [server] settings that configure it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiohttp.http_exceptions import BadHttpMessage, BadStatusLine, LineTooLong

from agent.config import ServerSettings, Settings, format_validation_error
from agent.server.limits import (
    REJECTED_STATUSES,
    ConnectionCounter,
    NoEvents,
    RequestTimeout,
    ServerLimits,
    classify_parse_error,
    raw_error_response,
    rejected_label,
    throttle_reason,
)
from agent.server.metrics import Metrics
from tests.fuzz.rawhttp import parse_responses


def test_raw_error_response_is_complete_http_with_json() -> None:
    raw = raw_error_response(503, "too many connections", "too_many_connections", retry_after=2)
    [response] = parse_responses(raw)
    assert response.status == 503
    assert response.header("connection") == "close"
    assert response.header("retry-after") == "2"
    assert response.header("content-type") == "application/json; charset=utf-8"
    assert int(response.header("content-length") or 0) == len(response.body)
    assert response.json() == {
        "error": {
            "message": "too many connections",
            "type": "server_error",
            "param": None,
            "code": "too_many_connections",
        }
    }


def test_raw_error_response_without_retry_after() -> None:
    [response] = parse_responses(raw_error_response(408, "slow", "request_timeout"))
    assert response.header("retry-after") is None
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("exc", "status", "expected"),
    [
        pytest.param(LineTooLong(b"/aaaa...", 4096), 400, (414, "uri_too_long"), id="long-uri"),
        pytest.param(LineTooLong(b"X-Header...", 4096), 400, (431, "headers_too_large"), id="long-header"),
        pytest.param(BadHttpMessage("Too many headers received"), 400, (431, "headers_too_large"), id="many"),
        pytest.param(BadStatusLine("GARBAGE"), 400, (400, "bad_http_request"), id="bad-status-line"),
        pytest.param(
            BadHttpMessage("Invalid header value char"), 400, (400, "bad_http_request"), id="bad-header"
        ),
        pytest.param(RuntimeError("boom"), 500, (500, "internal_error"), id="handler-crash"),
        pytest.param(None, 400, (400, "bad_http_request"), id="no-exception"),
    ],
)
def test_classify_parse_error(exc: BaseException | None, status: int, expected: tuple[int, str]) -> None:
    got_status, code, message = classify_parse_error(exc, status)
    assert (got_status, code) == expected
    assert message and "Traceback" not in message


def test_internal_errors_do_not_leak_the_exception_text() -> None:
    _, _, message = classify_parse_error(RuntimeError("secret path /etc/x"), 500)
    assert "secret" not in message


def test_counter_refuses_above_the_limit_and_drops_far_above() -> None:
    counter = ConnectionCounter(limit=2)
    seen = [counter.opened() for _ in range(5)]
    assert seen == [1, 2, 3, 4, 5]
    assert [counter.refuse(n) for n in seen] == [False, False, True, True, True]
    assert [counter.drop(n) for n in seen] == [False, False, False, False, True]
    for _ in seen:
        counter.closed()
    assert counter.active == 0


def test_limits_from_settings_take_every_server_setting() -> None:
    settings = ServerSettings(
        max_connections=7,
        max_header_bytes=2048,
        max_headers=9,
        max_body_bytes=4096,
        header_timeout_s=1.5,
        body_timeout_s=2.5,
        write_timeout_s=3.5,
        keepalive_timeout_s=4.5,
    )
    assert ServerLimits.from_settings(settings) == ServerLimits(7, 2048, 9, 4096, 1.5, 2.5, 3.5, 4.5)


def test_default_limits_match_the_default_settings() -> None:
    assert ServerLimits.from_settings(ServerSettings()) == ServerLimits()


def test_handler_kwargs_map_onto_aiohttp() -> None:
    kwargs = ServerLimits(max_header_bytes=3000, max_headers=12, keepalive_timeout_s=9).handler_kwargs()
    assert kwargs == {
        "keepalive_timeout": 9,
        "max_line_size": 3000,
        "max_field_size": 3000,
        "max_headers": 12,
    }


def test_request_timeout_is_an_http_408() -> None:
    err = RequestTimeout("slow")
    assert (err.status, err.code, err.type) == (408, "request_timeout", "invalid_request_error")


@pytest.mark.parametrize(
    ("values", "key"),
    [
        pytest.param({"max_connections": 0}, "server.max_connections", id="no-connections"),
        pytest.param({"max_headers": 2}, "server.max_headers", id="too-few-headers"),
        pytest.param({"header_timeout_s": 0}, "server.header_timeout_s", id="zero-header-timeout"),
        pytest.param({"body_timeout_s": -1}, "server.body_timeout_s", id="negative-body-timeout"),
        pytest.param({"write_timeout_s": 99999}, "server.write_timeout_s", id="huge-write-timeout"),
        pytest.param({"max_header_bytes": 10}, "server.max_header_bytes", id="tiny-headers"),
        pytest.param({"max_connections": "many"}, "server.max_connections", id="not-a-number"),
    ],
)
def test_bad_limit_settings_are_refused(values: dict[str, Any], key: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        Settings(server=values)  # type: ignore[arg-type]
    line = format_validation_error(info.value, "config error")
    assert line.startswith(f"config error: {key} = "), line


def test_limits_settable_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_AGENT_SERVER__MAX_CONNECTIONS", "12")
    monkeypatch.setenv("EDGE_AGENT_SERVER__HEADER_TIMEOUT_S", "2.5")
    limits = ServerLimits.from_settings(Settings().server)
    assert (limits.max_connections, limits.header_timeout_s) == (12, 2.5)
    assert json.dumps(limits.handler_kwargs())


def _error(code: object) -> bytes:
    return json.dumps({"error": {"message": "m", "type": "t", "param": None, "code": code}}).encode()


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        pytest.param(429, _error("rate_limit_exceeded"), "rate_limit", id="role-rate-limit"),
        pytest.param(429, _error("overloaded"), "queue_full", id="full-queue"),
        pytest.param(503, _error("overloaded"), None, id="overloaded-503-is-not-a-429"),
        pytest.param(429, _error("something_else"), None, id="unknown-code"),
        pytest.param(429, _error(None), None, id="no-code"),
        pytest.param(429, b'{"error": "flat"}', None, id="error-not-an-object"),
        pytest.param(429, b"[]", None, id="body-not-an-object"),
        pytest.param(429, b"not json", None, id="body-not-json"),
        pytest.param(429, None, None, id="no-body"),
        pytest.param(429, b" " * 5000 + _error("overloaded"), None, id="body-too-large-to-parse"),
    ],
)
def test_throttle_reason(status: int, body: object, expected: str | None) -> None:
    assert throttle_reason(status, body) == expected


@pytest.mark.parametrize(
    ("status", "label"),
    [
        pytest.param(400, "400", id="malformed"),
        pytest.param(414, "414", id="uri-too-long"),
        pytest.param(417, "417", id="expectation-failed"),
        pytest.param(431, "431", id="headers-too-large"),
        pytest.param(500, "500", id="internal"),
        pytest.param(504, "other", id="unlisted-status"),
        pytest.param(999, "other", id="nonsense-status"),
    ],
)
def test_rejected_label_is_bounded(status: int, label: str) -> None:
    assert rejected_label(status) == label


def test_metrics_pre_create_every_rejected_label() -> None:
    registry = Metrics().registry
    for status in (*REJECTED_STATUSES, "other"):
        assert registry.get_sample_value("edge_agent_requests_rejected_total", {"status": status}) == 0


def test_counter_reports_open_connections_and_the_limit_to_the_metrics() -> None:
    metrics = Metrics()
    counter = ConnectionCounter(limit=3, events=metrics)
    gauge = metrics.registry.get_sample_value
    assert (gauge("edge_agent_connections_open"), gauge("edge_agent_connections_limit")) == (0, 3)
    counter.opened()
    counter.opened()
    assert gauge("edge_agent_connections_open") == 2
    counter.closed()
    assert gauge("edge_agent_connections_open") == 1
    counter.refused_one("over_limit")
    counter.refused_one("dropped")
    counter.refused_one("dropped")
    assert counter.refused == 3
    assert gauge("edge_agent_connections_refused_total", {"reason": "over_limit"}) == 1
    assert gauge("edge_agent_connections_refused_total", {"reason": "dropped"}) == 2


def test_limits_carry_their_events_sink_outside_equality() -> None:
    metrics = Metrics()
    limits = ServerLimits.from_settings(ServerSettings(), metrics)
    assert limits.events is metrics
    assert limits == ServerLimits()
    assert isinstance(ServerLimits.from_settings(ServerSettings()).events, NoEvents)
