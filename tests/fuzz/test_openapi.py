"""The OpenAPI document: served over the socket, complete, and made of valid JSON Schema."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest
from pydantic import BaseModel

from agent.engine.pool import ModelPool
from agent.server import openapi, schemas
from agent.server.http import build_app
from tests.daemon import Daemon, uds_client


def _app_spec() -> dict[str, Any]:
    app = build_app(
        ModelPool(), {"max_body_bytes": 1 << 20, "default_max_tokens": 16, "request_timeout_s": 5.0}
    )
    return openapi.build_spec(openapi.app_routes(app.router))


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


def _resolve(spec: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = spec
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_served_document_matches_the_route_table(bare_daemon: Daemon) -> None:
    with uds_client(bare_daemon.socket, timeout=10) as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    served = response.json()
    ours = _app_spec()  # build_app's routes; the daemon may add more (e.g. /metrics from app.py)
    assert served["openapi"] == "3.1.0"
    for path, operations in ours["paths"].items():
        assert served["paths"][path] == operations, path
    for name, schema in ours["components"]["schemas"].items():
        assert served["components"]["schemas"][name] == schema, name
    assert "/openapi.json" in served["paths"]


def test_every_route_is_documented() -> None:
    app = build_app(
        ModelPool(), {"max_body_bytes": 1 << 20, "default_max_tokens": 16, "request_timeout_s": 5.0}
    )
    spec = openapi.build_spec(openapi.app_routes(app.router))
    for method, path, _ in openapi.app_routes(app.router):
        if method == "HEAD":
            continue
        operation = spec["paths"][path][method.lower()]
        assert "200" in operation["responses"]
        if method == "POST" and path.startswith("/v1/"):
            assert "requestBody" in operation, f"{method} {path} has no documented body"
            assert {"400", "413", "429", "503"} <= set(operation["responses"])


def test_every_reference_resolves() -> None:
    spec = _app_spec()
    refs = _refs(spec)
    assert refs
    for ref in refs:
        assert _resolve(spec, ref) is not None


def test_component_schemas_are_valid_json_schema_2020_12() -> None:
    for name, schema in _app_spec()["components"]["schemas"].items():
        try:
            jsonschema_rs.meta.validate(schema)
        except jsonschema_rs.ValidationError as exc:  # pragma: no cover - the message names the schema
            pytest.fail(f"{name}: {exc}")


def validator(spec: dict[str, Any], name: str) -> Any:
    """A JSON Schema validator for ``components.schemas[name]``, its references resolved in ``spec``."""
    return jsonschema_rs.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": spec["components"]}
    )


@pytest.mark.parametrize(
    ("path", "schema"),
    [
        pytest.param("/health", "Health", id="health"),
        pytest.param("/v1/models", "ModelList", id="models"),
        pytest.param("/admin/status", "Status", id="status"),
        pytest.param("/nope", "ErrorResponse", id="error"),
    ],
)
def test_live_responses_match_their_schema(bare_daemon: Daemon, path: str, schema: str) -> None:
    spec = _app_spec()
    with uds_client(bare_daemon.socket, timeout=10) as client:
        body = client.get(path).json()
    errors = [str(e) for e in validator(spec, schema).iter_errors(body)]
    assert errors == []
    assert not validator(spec, schema).is_valid({"unexpected": "shape"})


def test_request_body_schema_is_the_pydantic_model() -> None:
    spec = _app_spec()
    body = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schema = _resolve(spec, body["$ref"])
    assert schema["required"] == ["prompt"]
    assert schema["properties"]["temperature"]["maximum"] == 2.0
    assert openapi.request_models()[("POST", "/v1/completions")] is schemas.CompletionBody


_BODY_MODELS: dict[str, type[BaseModel]] = {
    "CompletionBody": schemas.CompletionBody,
    "ChatBody": schemas.ChatBody,
    "EmbeddingBody": schemas.EmbeddingBody,
}
_HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("name", "body", "valid"),
    [
        pytest.param("CompletionBody", {"prompt": "x"}, True, id="prompt-string"),
        pytest.param("CompletionBody", {"prompt": ["x"]}, True, id="prompt-one-item"),
        pytest.param("CompletionBody", {"prompt": []}, False, id="prompt-no-item"),
        pytest.param("CompletionBody", {"prompt": ["x", "y"]}, False, id="prompt-two-items"),
        pytest.param("CompletionBody", {"prompt": "x", "stop": ["a"] * 4}, True, id="four-stops"),
        pytest.param("CompletionBody", {"prompt": "x", "stop": ["a"] * 5}, False, id="five-stops"),
        pytest.param("CompletionBody", {"prompt": "x", "logit_bias": {"15": -100}}, True, id="bias"),
        pytest.param("CompletionBody", {"prompt": "x", "logit_bias": {"x": 1}}, False, id="bias-word-key"),
        pytest.param(
            "CompletionBody", {"prompt": "x", "logit_bias": {"\u00b2": 1}}, False, id="bias-sup-key"
        ),
        pytest.param("CompletionBody", {"prompt": "x", "logit_bias": {"-1": 1}}, False, id="bias-neg-key"),
        pytest.param("CompletionBody", {"prompt": "x", "logit_bias": {"1": 101}}, False, id="bias-too-big"),
        pytest.param("CompletionBody", {"prompt": "x", "max_tokens": 5.0}, True, id="integer-as-float"),
        pytest.param("CompletionBody", {"prompt": "x", "max_tokens": 5.5}, False, id="fraction"),
        pytest.param("CompletionBody", {"prompt": "x", "max_tokens": "5"}, False, id="integer-as-string"),
        pytest.param("CompletionBody", {"prompt": "x", "max_tokens": True}, False, id="integer-as-bool"),
        pytest.param("CompletionBody", {"prompt": "x", "temperature": 1}, True, id="float-as-integer"),
        pytest.param(
            "ChatBody", {"messages": _HI, "top_k": 3.0, "n": 1.0}, True, id="chat-integers-as-float"
        ),
        pytest.param(
            "ChatBody",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
            True,
            id="text-part",
        ),
        pytest.param(
            "ChatBody",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            False,
            id="image-part",
        ),
        pytest.param(
            "ChatBody",
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            False,
            id="part-no-text",
        ),
        pytest.param("ChatBody", {"messages": []}, False, id="no-messages"),
        pytest.param("ChatBody", {"messages": _HI, "audio": {}}, False, id="unsupported-field"),
        pytest.param(
            "ChatBody", {"messages": [{"role": "user", "content": "x", "x": 1}]}, False, id="message-extra"
        ),
        pytest.param(
            "ChatBody", {"messages": _HI, "metadata": {"a": "b"}, "store": True}, True, id="metadata"
        ),
        pytest.param(
            "ChatBody",
            {
                "messages": _HI,
                "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
            },
            True,
            id="json-schema",
        ),
        pytest.param(
            "ChatBody",
            {"messages": _HI, "response_format": {"type": "json_schema"}},
            False,
            id="json-schema-missing",
        ),
        pytest.param(
            "ChatBody", {"messages": _HI, "response_format": {"type": "yaml"}}, False, id="format-type"
        ),
        pytest.param("CompletionBody", {"prompt": "x", "grammar": 'root ::= "a"'}, True, id="grammar"),
        pytest.param("CompletionBody", {"prompt": "x", "grammar": ""}, False, id="empty-grammar"),
        pytest.param("CompletionBody", {"prompt": "x", "suffix": "y"}, False, id="completion-extra"),
        pytest.param("EmbeddingBody", {"input": "a", "extra": 1}, False, id="embedding-extra"),
        pytest.param("EmbeddingBody", {"input": ["a"] * 512}, True, id="512-inputs"),
        pytest.param("EmbeddingBody", {"input": ["a"] * 513}, False, id="513-inputs"),
        pytest.param("EmbeddingBody", {"input": []}, False, id="no-inputs"),
        pytest.param("EmbeddingBody", {"input": "a", "dimensions": 8.0}, True, id="dimensions-as-float"),
    ],
)
def test_request_schema_accepts_exactly_what_validation_accepts(
    name: str, body: dict[str, Any], valid: bool
) -> None:
    """What schemathesis relies on (tests/fuzz/test_schemathesis.py), case by case, without a model."""
    in_schema = validator(_app_spec(), name).is_valid(body)
    try:
        _BODY_MODELS[name].model_validate(body)
        validates = True
    except ValueError:  # pydantic's ValidationError
        validates = False
    assert (in_schema, validates) == (valid, valid)


def test_retry_after_documented_for_429_and_503() -> None:
    responses = _app_spec()["components"]["responses"]
    for status in ("429", "503"):
        assert "Retry-After" in responses[f"Error{status}"]["headers"]
    assert "headers" not in responses["Error400"]


@pytest.mark.parametrize(
    ("routes", "expected"),
    [
        pytest.param([("GET", "/a", None)], {"/a": ["get"]}, id="get"),
        pytest.param([("GET", "/a", None), ("HEAD", "/a", None)], {"/a": ["get"]}, id="head-skipped"),
        pytest.param([("POST", "/a", None), ("GET", "/a", None)], {"/a": ["post", "get"]}, id="two-methods"),
        pytest.param([("*", "/any", None)], {}, id="wildcard-skipped"),
    ],
)
def test_build_spec_operations(routes: list[tuple[str, str, Any]], expected: dict[str, list[str]]) -> None:
    spec = openapi.build_spec(routes, models={})
    assert {path: list(ops) for path, ops in spec["paths"].items()} == expected


def test_path_parameters_are_declared() -> None:
    spec = openapi.build_spec([("POST", "/admin/models/{model_id}/pin", None)], models={})
    operation = spec["paths"]["/admin/models/{model_id}/pin"]["post"]
    assert operation["parameters"] == [
        {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
    ]


def test_text_routes_document_text() -> None:
    spec = openapi.build_spec([("GET", "/metrics", None)], models={})
    assert spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"] == {
        "text/plain": {"schema": {"type": "string"}}
    }


def test_summary_comes_from_the_handler_docstring() -> None:
    async def handler() -> None:
        """Pin a model so it is never unloaded.

        More text.
        """

    spec = openapi.build_spec([("POST", "/x", handler)], models={})
    assert spec["paths"]["/x"]["post"]["summary"] == "Pin a model so it is never unloaded."
