"""Tool calling on the real daemon with the ``openai`` client, on Gemma 3 270M and
SmolLM2-135M-Instruct (neither template knows tools: the generic format of agent/server/tools.py).

Each ``tool_choice`` mode, streamed and not; arguments that validate against the function's
parameters; ids; ``finish_reason: "tool_calls"``; a follow-up turn with the tool's result; the
SDK's ``pydantic_function_tool``; bad tool requests as a table of 400s naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import jsonschema_rs
import openai
import pytest
from pydantic import BaseModel, Field

from agent.demo import CHAT_MODEL_ID, DEMO_MODEL_ID
from tests.daemon import Daemon, demo_daemon, openai_client

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODELS = [pytest.param(DEMO_MODEL_ID, id="gemma"), pytest.param(CHAT_MODEL_ID, id="smollm2")]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                       "required": ["city"]},
    },
}  # fmt: skip
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Daemon]:
    with demo_daemon(tmp_path_factory.mktemp("tools")) as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[Any]:
    with openai_client(daemon.socket) as c:
        yield c


def _valid_calls(calls: list[Any], names: set[str]) -> None:
    assert calls
    ids = [c.id for c in calls]
    assert len(set(ids)) == len(ids) and all(i.startswith("call_") for i in ids)
    for call in calls:
        assert call.type == "function" and call.function.name in names
        args = json.loads(call.function.arguments)
        errors = [str(e) for e in jsonschema_rs.validator_for(SCHEMAS[call.function.name]).iter_errors(args)]
        assert errors == [], (call.function.arguments, errors)


def _stream(client: Any, **kwargs: Any) -> tuple[str, list[Any], str | None, list[Any]]:
    """Content, tool calls put together from the deltas as the SDK does, finish reason, raw deltas."""
    stream = client.chat.completions.create(stream=True, **kwargs)
    content, deltas, finish = [], [], None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in stream:
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                deltas.append(d)
                call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                if d.id:
                    assert call["id"] is None, "an id is sent once"
                    call["id"], call["name"] = d.id, d.function.name
                call["arguments"] += d.function.arguments or ""
    merged = [
        openai.types.chat.ChatCompletionMessageToolCall(
            id=c["id"], type="function", function={"name": c["name"], "arguments": c["arguments"]}
        )
        for _, c in sorted(calls.items())
    ]
    return "".join(content), merged, finish, deltas


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_required_calls_a_tool_on_every_model(client: Any, model: str, stream: bool) -> None:
    kwargs = {"model": model, "messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 120,
              "temperature": 0}  # fmt: skip
    if stream:
        content, calls, finish, deltas = _stream(client, **kwargs)
        assert content == "" and len(deltas) > len(calls)  # the arguments came in pieces
    else:
        reply = client.chat.completions.create(**kwargs)
        message, finish = reply.choices[0].message, reply.choices[0].finish_reason
        assert message.content is None
        calls = message.tool_calls
    assert finish == "tool_calls"
    _valid_calls(calls, {"get_weather", "get_time"})


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_named_function_is_called_alone(client: Any, model: str, stream: bool) -> None:
    kwargs = {"model": model, "messages": ASK, "tools": TOOLS, "max_tokens": 120, "temperature": 0,
              "tool_choice": {"type": "function", "function": {"name": "get_time"}}}  # fmt: skip
    if stream:
        _, calls, finish, _ = _stream(client, **kwargs)
    else:
        reply = client.chat.completions.create(**kwargs)
        calls, finish = reply.choices[0].message.tool_calls, reply.choices[0].finish_reason
    assert finish == "tool_calls" and len(calls) == 1
    _valid_calls(calls, {"get_time"})


def test_parallel_tool_calls_false_gives_one_call(client: Any) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL_ID,
        messages=[{"role": "user", "content": "Weather and time in Paris and in Rome?"}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=120,
        temperature=0,
    )
    assert len(reply.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("model", MODELS)
def test_auto_answers_in_text_or_valid_calls(client: Any, model: str) -> None:
    for messages in (ASK, [{"role": "user", "content": "Say hello to me."}]):
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=TOOLS, max_tokens=60, temperature=0
        )
        choice = reply.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            _valid_calls(choice.message.tool_calls, {"get_weather", "get_time"})
        else:
            assert choice.message.content and not choice.message.content.lstrip().startswith("{")


def test_none_answers_in_text(client: Any) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=30, temperature=0
    )
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_follow_up_turn_carries_the_tool_result(client: Any, model: str, stream: bool) -> None:
    first = client.chat.completions.create(
        model=model, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=120, temperature=0
    )
    message = first.choices[0].message
    history = [*ASK, message.model_dump(exclude_none=False)]  # echoed back as the SDK's object gives it
    history += [
        {"role": "tool", "tool_call_id": c.id, "content": "18 degrees, sunny"} for c in message.tool_calls
    ]
    kwargs = {"model": model, "messages": history, "tools": [WEATHER], "tool_choice": "none",
              "max_tokens": 40, "temperature": 0}  # fmt: skip
    if stream:
        content, calls, finish, _ = _stream(client, **kwargs)
    else:
        reply = client.chat.completions.create(**kwargs)
        content, calls, finish = reply.choices[0].message.content or "", [], reply.choices[0].finish_reason
    assert content.strip() and not calls and finish in ("stop", "length")
    if model == CHAT_MODEL_ID:
        assert "18" in content or "sunny" in content.lower(), content


class Lookup(BaseModel):
    """Look a word up in the dictionary."""

    word: str = Field(max_length=30)
    language: Literal["en", "fr"]


def test_the_sdk_pydantic_function_tool(client: Any) -> None:
    completion = client.chat.completions.parse(
        model=CHAT_MODEL_ID,
        messages=[{"role": "user", "content": "What does the French word 'chat' mean?"}],
        tools=[openai.pydantic_function_tool(Lookup)],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "Lookup"
    assert isinstance(call.function.parsed_arguments, Lookup)


BAD = [
    pytest.param({"tool_choice": "required"}, "tool_choice", id="choice-without-tools"),
    pytest.param({"parallel_tool_calls": True}, "parallel_tool_calls", id="parallel-without-tools"),
    pytest.param({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                 "tool_choice.function.name", id="unknown-named-function"),
    pytest.param({"tools": [WEATHER, WEATHER]}, "tools.1.function.name", id="duplicate-name"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                 "properties": {"x": {"type": "string", "pattern": "a+"}}}}}]}, "tools.0.function.parameters",
                 id="unsupported-keyword"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f",
                                                              "parameters": {"type": "string"}}}]},
                 "tools.0.function.parameters", id="parameters-not-object"),
    pytest.param({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools.0.custom",
                 id="custom-tool"),
    pytest.param({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format",
                 id="tools-and-json"),
    pytest.param({"messages": [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]},
                 "messages.0.tool_call_id", id="result-of-no-call"),
    pytest.param({"messages": [{"role": "tool", "content": "1"}]}, "messages.0.tool_call_id",
                 id="result-without-id"),
    pytest.param({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0.tool_calls",
                 id="calls-on-a-user-message"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param"), BAD)
def test_bad_tool_requests_are_400s_naming_the_field(client: Any, extra: dict[str, Any], param: str) -> None:
    body = {"model": CHAT_MODEL_ID, "messages": ASK, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body=body, cast_to=object)
    assert caught.value.body["param"] == param, caught.value.body
