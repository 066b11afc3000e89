"""Schemathesis against the served /openapi.json, over the Unix socket, with the real model.

Schemathesis generates the requests (valid ones, and with ``negative`` mode ones that break the
schema: wrong types, missing fields, out-of-range values); httpx sends them over the socket (the
transport schemathesis cannot provide), and schemathesis judges each response: never a 5xx, a
documented status and content type, a body (or each SSE event) that matches the documented schema.

Schemathesis' ``negative_data_rejection`` check is left out on purpose: the request models validate
in pydantic's lax mode (``"5"`` and ``true`` are accepted where a number is documented), so some
schema-violating bodies are rightly answered 200. What the negative mode still proves: no invalid
body gets a 5xx or an undocumented answer, and the daemon stays up.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.daemon import Daemon, uds_client

pytestmark = [pytest.mark.model, pytest.mark.slow]

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

OPERATIONS = [
    pytest.param("/v1/completions", "POST", GenerationMode.POSITIVE, 12, id="completions-valid"),
    pytest.param("/v1/completions", "POST", GenerationMode.NEGATIVE, 25, id="completions-invalid"),
    pytest.param("/v1/chat/completions", "POST", GenerationMode.POSITIVE, 10, id="chat-valid"),
    pytest.param("/v1/chat/completions", "POST", GenerationMode.NEGATIVE, 25, id="chat-invalid"),
    pytest.param("/v1/embeddings", "POST", GenerationMode.POSITIVE, 10, id="embeddings-valid"),
    pytest.param("/v1/embeddings", "POST", GenerationMode.NEGATIVE, 25, id="embeddings-invalid"),
    pytest.param("/v1/models", "GET", GenerationMode.POSITIVE, 3, id="models"),
    pytest.param("/health", "GET", GenerationMode.POSITIVE, 3, id="health"),
]


@pytest.fixture(scope="module")
def api(model_daemon: Daemon) -> Iterator[tuple[Any, httpx.Client]]:
    with uds_client(model_daemon.socket, timeout=60) as client:
        spec = client.get("/openapi.json").json()
        yield schemathesis.openapi.from_dict(spec), client


def _send(client: httpx.Client, case: Any) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url="http://localhost")
    body: dict[str, Any] = {}
    if "json" in kwargs:
        body["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        body["content"] = kwargs["data"]
    return client.request(
        kwargs["method"],
        kwargs["url"],
        headers=kwargs.get("headers"),
        params=kwargs.get("params"),
        **body,
    )


@pytest.mark.parametrize(("path", "method", "mode", "examples"), OPERATIONS)
def test_schemathesis(
    api: tuple[Any, httpx.Client],
    model_daemon: Daemon,
    path: str,
    method: str,
    mode: GenerationMode,
    examples: int,
) -> None:
    schema, client = api
    operation = schema[path][method]
    seen: list[int] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        case = data.draw(operation.as_strategy(generation_mode=mode))
        response = _send(client, case)
        seen.append(response.status_code)
        case.validate_response(response, checks=CHECKS)

    run()
    assert seen, "schemathesis generated no request"
    assert model_daemon.proc.poll() is None, "daemon exited"
    assert model_daemon.health()["status"] == "ok"
