"""Nothing silently ignored: every request field is implemented, accepted as metadata, or refused.

No model: the request models alone (agent/server/schemas.py), and the bodies the official ``openai``
client really sends (captured with an httpx mock transport).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from agent.errors import BadRequest
from agent.server import schemas, tools

HI = [{"role": "user", "content": "Hi"}]
CHAT = {"messages": HI}
COMPLETION = {"prompt": "Edge"}
EMBEDDING = {"input": "edge"}

REFUSED = [
    pytest.param(
        schemas.ChatBody, {**CHAT, "audio": {"voice": "alloy", "format": "wav"}}, "audio", id="audio"
    ),
    pytest.param(
        schemas.ChatBody,
        {**CHAT, "prediction": {"type": "content", "content": "x"}},
        "prediction",
        id="prediction",
    ),
    pytest.param(schemas.ChatBody, {**CHAT, "reasoning_effort": "low"}, "reasoning_effort", id="reasoning"),
    pytest.param(schemas.ChatBody, {**CHAT, "verbosity": "low"}, "verbosity", id="verbosity"),
    pytest.param(schemas.ChatBody, {**CHAT, "web_search_options": {}}, "web_search_options", id="web-search"),
    pytest.param(schemas.ChatBody, {**CHAT, "functions": [{"name": "f"}]}, "functions", id="functions"),
    pytest.param(schemas.ChatBody, {**CHAT, "function_call": "auto"}, "function_call", id="function-call"),
    pytest.param(schemas.ChatBody, {**CHAT, "moderation": {}}, "moderation", id="moderation"),
    pytest.param(
        schemas.ChatBody,
        {**CHAT, "prompt_cache_retention": "24h"},
        "prompt_cache_retention",
        id="cache-retention",
    ),
    pytest.param(schemas.ChatBody, {**CHAT, "temprature": 0.5}, "temprature", id="typo"),
    pytest.param(
        schemas.ChatBody,
        {"messages": [{"role": "user", "content": "Hi", "name": "bob"}]},
        "messages.0.name",
        id="message-name",
    ),
    pytest.param(
        schemas.ChatBody,
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}]},
        "messages.0.content",
        id="part-extra",
    ),
    pytest.param(
        schemas.ChatBody,
        {**CHAT, "stream": True, "stream_options": {"include_usage": True, "chunk_size": 3}},
        "stream_options.chunk_size",
        id="stream-options-extra",
    ),
    pytest.param(schemas.CompletionBody, {**COMPLETION, "suffix": "!"}, "suffix", id="suffix"),
    pytest.param(schemas.CompletionBody, {**COMPLETION, "best_of": 2}, "best_of", id="best-of"),
    pytest.param(schemas.EmbeddingBody, {**EMBEDDING, "input_type": "query"}, "input_type", id="embed-extra"),
]


@pytest.mark.parametrize(("model", "body", "param"), REFUSED)
def test_unimplemented_fields_are_refused_by_name(
    model: type[BaseModel], body: dict[str, Any], param: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        schemas.parse_body(model, body)
    assert (caught.value.param, caught.value.code) == (param, schemas.UNSUPPORTED)
    assert str(caught.value).startswith(f"{param}: unsupported parameter")


WRONG_VALUE = [
    pytest.param(schemas.ChatBody, {**CHAT, "n": 2}, "n", id="n-above-1"),
    pytest.param(schemas.ChatBody, {**CHAT, "modalities": ["text", "audio"]}, "modalities", id="audio-out"),
    pytest.param(schemas.ChatBody, {**CHAT, "service_tier": "flex"}, "service_tier", id="flex-tier"),
    pytest.param(
        schemas.ChatBody,
        {**CHAT, "stream_options": {"include_obfuscation": True}},
        "stream_options.include_obfuscation",
        id="obfuscation",
    ),
    pytest.param(
        schemas.ChatBody,
        {**CHAT, "metadata": {str(i): "x" for i in range(17)}},
        "metadata",
        id="metadata-17-keys",
    ),
    pytest.param(
        schemas.ChatBody,
        {"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]},
        "messages.0.refusal",
        id="echoed-refusal-text",
    ),
]


@pytest.mark.parametrize(("model", "body", "param"), WRONG_VALUE)
def test_values_we_cannot_honour_are_refused(
    model: type[BaseModel], body: dict[str, Any], param: str
) -> None:
    with pytest.raises(BadRequest) as caught:
        schemas.parse_body(model, body)
    assert caught.value.param == param
    assert caught.value.code is None


METADATA = [
    pytest.param(
        schemas.ChatBody, {**CHAT, "user": "u1", "store": False, "metadata": {"app": "x"}}, id="chat"
    ),
    pytest.param(
        schemas.ChatBody,
        {
            **CHAT,
            "safety_identifier": "h",
            "prompt_cache_key": "k",
            "service_tier": "auto",
            "modalities": ["text"],
            "n": 1,
        },
        id="chat-harmless",
    ),
    pytest.param(
        schemas.ChatBody,
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {
                    "role": "assistant",
                    "content": "Hello",
                    "refusal": None,
                    "audio": None,
                    "function_call": None,
                    "annotations": None,
                },
            ]
        },
        id="echoed-assistant-message",
    ),
    pytest.param(schemas.CompletionBody, {**COMPLETION, "user": "u1", "n": 1, "echo": True}, id="completion"),
    pytest.param(
        schemas.EmbeddingBody, {**EMBEDDING, "user": "u1", "encoding_format": "base64"}, id="embedding"
    ),
]


@pytest.mark.parametrize(("model", "body"), METADATA)
def test_metadata_fields_are_accepted(model: type[BaseModel], body: dict[str, Any]) -> None:
    schemas.parse_body(model, body)


def _sent_by_sdk(call: Any) -> dict[str, Any]:
    """The JSON body the official client sends for ``call(client)``."""
    import openai

    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(400, json=schemas.error_json("captured", "invalid_request_error"))

    client = openai.OpenAI(
        base_url="http://localhost/v1",
        api_key="unused",
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
        max_retries=0,
    )
    with pytest.raises(openai.BadRequestError):
        call(client)
    return seen[0]


SDK_CALLS = [
    pytest.param(schemas.ChatBody, lambda c: c.chat.completions.create(model="m", messages=HI), id="chat"),
    pytest.param(
        schemas.ChatBody,
        lambda c: c.chat.completions.create(model="m", messages=HI, stream=True),
        id="chat-stream",
    ),
    pytest.param(
        schemas.CompletionBody, lambda c: c.completions.create(model="m", prompt="x"), id="completion"
    ),
    pytest.param(schemas.EmbeddingBody, lambda c: c.embeddings.create(model="m", input="x"), id="embedding"),
    pytest.param(
        schemas.ChatBody,
        lambda c: c.chat.completions.parse(model="m", messages=HI, response_format=Answer),
        id="parse-helper",
    ),
    pytest.param(
        schemas.ChatBody,
        lambda c: c.chat.completions.parse(
            model="m", messages=HI, tools=[openai.pydantic_function_tool(Answer)], tool_choice="required"
        ),
        id="pydantic-function-tool",
    ),
    pytest.param(
        schemas.ChatBody,
        lambda c: c.chat.completions.stream(model="m", messages=HI, response_format=Answer).__enter__(),
        id="stream-helper",
    ),
]


class Answer(BaseModel):
    """What the SDK's helpers turn into a strict JSON Schema."""

    city: str
    population: int | None


@pytest.mark.parametrize(("model", "call"), SDK_CALLS)
def test_what_the_openai_client_sends_by_default_is_accepted(model: type[BaseModel], call: Any) -> None:
    """... and its helpers' strict schemas (pydantic's) compile into grammars."""
    body = schemas.parse_body(model, _sent_by_sdk(call))
    if isinstance(body, schemas.ChatBody):
        body.sampling()
        tools.plan_tools(body)
