"""End to end: the real daemon, the real model, the official OpenAI client over the Unix socket."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

import openai
import pytest

from tests.daemon import Daemon, openai_client, uds_client

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m-q4_k_m"
PROMPT_TOKENS = 9  # <bos> + 8 tokens of "The Eiffel Tower is in the city of"


_clients: list[openai.OpenAI] = []


def _oai(daemon: Daemon) -> openai.OpenAI:
    client = openai_client(daemon.socket)
    _clients.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def test_health_reports_ready_model(daemon: Daemon) -> None:
    health = daemon.health()
    assert health["status"] == "ok"
    assert health["loading"] is False
    assert health["default_model"] == MODEL
    assert health["models"] == {MODEL: "ready"}
    assert health["uptime_s"] > 0


def test_socket_mode_is_0660(daemon: Daemon) -> None:
    mode = stat.S_IMODE(os.stat(daemon.socket).st_mode)
    assert mode == 0o660


def test_models_list(daemon: Daemon) -> None:
    models = _oai(daemon).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_plain_completion_returns_text_and_usage(daemon: Daemon) -> None:
    client = _oai(daemon)
    result = client.completions.create(
        model=MODEL, prompt="The Eiffel Tower is in the city of", max_tokens=12, temperature=0
    )
    text = result.choices[0].text
    assert "Paris" in text
    assert result.choices[0].finish_reason in {"stop", "length"}
    assert result.usage is not None
    assert result.usage.prompt_tokens == PROMPT_TOKENS
    assert 1 <= result.usage.completion_tokens <= 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


def test_streaming_completion_matches_plain(daemon: Daemon) -> None:
    client = _oai(daemon)
    kwargs = {"model": MODEL, "prompt": "Edge computing is", "max_tokens": 16, "temperature": 0}
    plain = client.completions.create(**kwargs).choices[0].text
    pieces: list[str] = []
    finishes: list[str | None] = []
    usage = None
    stream = client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text)
            finishes.append(choice.finish_reason)
    assert len([p for p in pieces if p]) > 1, "streamed in several chunks"
    assert "".join(pieces) == plain
    assert finishes[-1] == "length"
    assert all(f is None for f in finishes[:-1])
    assert usage is not None and usage.completion_tokens == 16


def test_max_tokens_and_length_finish(daemon: Daemon) -> None:
    client = _oai(daemon)
    result = client.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=3, temperature=0)
    assert result.choices[0].finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 3


def test_stop_string_ends_generation(daemon: Daemon) -> None:
    client = _oai(daemon)
    result = client.completions.create(
        model=MODEL, prompt="1, 2, 3, 4,", max_tokens=32, temperature=0, stop=[" 7"]
    )
    assert result.choices[0].finish_reason == "stop"
    assert " 7" not in result.choices[0].text
    assert "6" in result.choices[0].text


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        pytest.param(b"{not json", 400, None, None, id="malformed-json"),
        pytest.param(b"[1,2]", 400, None, None, id="not-an-object"),
        pytest.param(b"", 400, None, None, id="empty-body"),
        pytest.param(b'{"max_tokens": 5}', 400, None, "prompt", id="missing-prompt"),
        pytest.param(b'{"prompt": "x", "max_tokens": "many"}', 400, None, "max_tokens", id="wrong-type"),
        pytest.param(b'{"prompt": "x", "max_tokens": "5"}', 400, None, "max_tokens", id="number-as-string"),
        pytest.param(b'{"prompt": "x", "max_tokens": true}', 400, None, "max_tokens", id="boolean-as-number"),
        pytest.param(
            b'{"prompt": "x", "temperature": "0.5"}', 400, None, "temperature", id="float-as-string"
        ),
        pytest.param(b'{"prompt": "x", "temperature": 7}', 400, None, "temperature", id="out-of-range"),
        pytest.param(b'{"prompt": "x", "n": 2}', 400, None, "n", id="n-above-one"),
        pytest.param(
            b'{"prompt": "x", "model": "nope"}', 404, "model_not_found", "model", id="unknown-model"
        ),
        pytest.param(
            b'{"prompt": "x", "max_tokens": 5000}', 400, "context_length_exceeded", "max_tokens", id="context"
        ),
        pytest.param(b'{"prompt": "\xff\xfe"}', 400, None, None, id="not-utf8"),
        pytest.param(
            b'{"prompt": "x", "logit_bias": {"300000": 5}}', 400, None, "logit_bias", id="bias-beyond-vocab"
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    daemon: Daemon, body: bytes, status: int, code: str | None, param: str | None
) -> None:
    with uds_client(daemon.socket) as c:
        r = c.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"]
    assert "Traceback" not in r.text
    assert err["type"]
    if code is not None:
        assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    assert r.headers["X-Request-Id"]


def test_context_overflow_names_the_numbers(daemon: Daemon) -> None:
    with uds_client(daemon.socket) as c:
        r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 5000})
    assert "5000" in r.json()["error"]["message"]
    assert "2048" in r.json()["error"]["message"]


def test_body_too_large_is_413(daemon: Daemon) -> None:
    with uds_client(daemon.socket) as c:
        r = c.post("/v1/completions", json={"prompt": "x" * (2 << 20)})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        pytest.param("GET", "/nope", 404, id="unknown-route"),
        pytest.param("GET", "/v1/completions", 405, id="wrong-method"),
    ],
)
def test_routing_errors_are_json(daemon: Daemon, method: str, path: str, status: int) -> None:
    with uds_client(daemon.socket) as c:
        r = c.request(method, path)
    assert r.status_code == status
    assert r.json()["error"]["message"]


def test_openai_client_raises_typed_errors(daemon: Daemon) -> None:
    client = _oai(daemon)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="missing", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", max_tokens=100000)


def test_request_id_is_echoed_and_logged(daemon: Daemon) -> None:
    with uds_client(daemon.socket) as c:
        r = c.get("/health", headers={"X-Request-Id": "trace-abc-123"})
    assert r.headers["X-Request-Id"] == "trace-abc-123"
    lines = [line for line in daemon.log_lines() if line.get("request_id") == "trace-abc-123"]
    assert lines and lines[-1]["event"] == "request"
    assert lines[-1]["peer_uid"] == os.getuid()
    assert lines[-1]["peer_pid"] > 0


def test_cli_complete_streams_text(daemon: Daemon) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.cli",
            "complete",
            "The Eiffel Tower is in the city of",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--socket",
            str(daemon.socket),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "Paris" in out.stdout


def test_cli_status_json(daemon: Daemon) -> None:
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--json", "--socket", str(daemon.socket)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(out.stdout)
    assert data["health"]["status"] == "ok"
    assert data["status"]["models"][0]["id"] == MODEL
