"""Schemathesis against the served /openapi.json, over the Unix socket, with the real model.

Schemathesis generates the requests (valid ones, and with ``negative`` mode ones that break the
schema: wrong types, missing fields, out-of-range values); httpx sends them over the socket (the
transport schemathesis cannot provide), and schemathesis judges each response: never a 5xx, a
documented status and content type, a body (or each SSE event) that matches the documented schema.

The request models are strict and their schema states every rule their validators enforce
(agent/server/schemas.py), so both directions are checked:

- negative runs apply schemathesis' ``negative_data_rejection``: every body that breaks the schema
  is refused with 400 (or 413 too big, 415 not JSON), never served;
- positive runs apply ``positive_data_acceptance``: every body the document allows is served
  (2xx), except for refusals that depend on the model served, which no schema can state (see
  :func:`model_dependent_refusal`: an unknown model name, a prompt beyond the context, the chat
  template's rules on roles, the model's embedding size, a ``logit_bias`` token id beyond its
  vocabulary), or on rules across fields that JSON Schema does not state here (a JSON Schema
  keyword the grammar cannot enforce, GBNF that llama.cpp cannot parse, a tool result answering no
  call, ``tool_choice`` without ``tools``, ``top_logprobs`` without ``logprobs``). These are
  named, and nothing else is excused.

Budget: about 20 s on 2 cores (most of it the positive runs, which generate a few tokens each).
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
from schemathesis.config._checks import NegativeDataRejectionConfig, PositiveDataAcceptanceConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
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

REJECTED = [400, 413, 415]
"""What a schema-violating body may get: wrong (400), too big (413), not JSON (415)."""
ACCEPTED = ["2xx"]
MODE_CHECKS = {
    GenerationMode.POSITIVE: [positive_data_acceptance],
    GenerationMode.NEGATIVE: [negative_data_rejection],
}
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"


def model_dependent_refusal(path: str, response: httpx.Response) -> str | None:
    """The name of a refusal of a schema-valid body that depends on the model served, else None."""
    if response.status_code not in (400, 404):
        return None
    error = response.json().get("error") or {}
    code, param = error.get("code"), error.get("param")
    if response.status_code == 404:
        return "unknown-model" if code == "model_not_found" else None
    if code == "context_length_exceeded":
        return "longer-than-context"
    if path == CHAT and param == "messages":
        return "chat-template-rules"  # e.g. Gemma's "roles must alternate user/assistant"
    if path == EMBEDDINGS and param == "dimensions":
        return "embedding-size"
    if param in ("logit_bias", "tokens") and "vocabulary" in str(error.get("message")):
        return "token-beyond-vocabulary"
    if code == "unsupported_schema":
        return "schema-beyond-the-grammar"  # a JSON Schema keyword the grammar cannot enforce
    if param == "grammar":
        return "grammar-syntax"  # GBNF that llama.cpp cannot parse
    if path == CHAT and str(param).endswith(".tool_call_id"):
        return "tool-result-without-its-call"  # a tool message answering no earlier call
    if param in ("top_logprobs", "logprobs"):
        return "logprobs-rules"  # top_logprobs without logprobs: true; logprobs with echo
    if path == CHAT and str(param).split(".")[0] in ("tool_choice", "parallel_tool_calls", "tools"):
        return "tool-rules"  # tool_choice without tools, a name given twice or not among them, ...
    return None


OPERATIONS = [
    pytest.param("/v1/completions", "POST", GenerationMode.POSITIVE, 12, id="completions-valid"),
    pytest.param("/v1/completions", "POST", GenerationMode.NEGATIVE, 150, id="completions-invalid"),
    pytest.param(CHAT, "POST", GenerationMode.POSITIVE, 10, id="chat-valid"),
    pytest.param(CHAT, "POST", GenerationMode.NEGATIVE, 150, id="chat-invalid"),
    pytest.param(EMBEDDINGS, "POST", GenerationMode.POSITIVE, 10, id="embeddings-valid"),
    pytest.param(EMBEDDINGS, "POST", GenerationMode.NEGATIVE, 150, id="embeddings-invalid"),
    pytest.param("/tokenize", "POST", GenerationMode.POSITIVE, 10, id="tokenize-valid"),
    pytest.param("/tokenize", "POST", GenerationMode.NEGATIVE, 60, id="tokenize-invalid"),
    pytest.param("/detokenize", "POST", GenerationMode.POSITIVE, 10, id="detokenize-valid"),
    pytest.param("/detokenize", "POST", GenerationMode.NEGATIVE, 60, id="detokenize-invalid"),
    pytest.param("/v1/models", "GET", GenerationMode.POSITIVE, 3, id="models"),
    pytest.param("/health", "GET", GenerationMode.POSITIVE, 3, id="health"),
]


@pytest.fixture(scope="module")
def api(model_daemon: Daemon) -> Iterator[tuple[Any, httpx.Client]]:
    with uds_client(model_daemon.socket, timeout=60) as client:
        spec = client.get("/openapi.json").json()
        schema = schemathesis.openapi.from_dict(spec)
        checks = schema.config.checks
        checks.negative_data_rejection = NegativeDataRejectionConfig(expected_statuses=REJECTED)
        checks.positive_data_acceptance = PositiveDataAcceptanceConfig(expected_statuses=ACCEPTED)
        yield schema, client


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
        excused = mode is GenerationMode.POSITIVE and model_dependent_refusal(path, response)
        case.validate_response(response, checks=CHECKS + ([] if excused else MODE_CHECKS[mode]))

    run()
    assert seen, "schemathesis generated no request"
    assert model_daemon.proc.poll() is None, "daemon exited"
    assert model_daemon.health()["status"] == "ok"
