"""Structured output on the real daemon with the ``openai`` client: ``response_format``
(``json_object``, ``json_schema``) and ``grammar``, plain and streamed, on Gemma 3 270M (a base
model) and SmolLM2-135M-Instruct. Every answer that ends by itself parses and validates against its
schema (the ``jsonschema_rs`` validator, formats checked); what the grammar cannot enforce is a 400
naming the keyword; the SDK's ``parse`` helper works end to end."""

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
PROMPT = (
    "Ada Lovelace was born on 1815-12-10 in London. She worked with Charles Babbage on the "
    "Analytical Engine and wrote the first program. Extract the facts as JSON."
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Daemon]:
    with demo_daemon(tmp_path_factory.mktemp("structured")) as d:
        yield d


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[Any]:
    with openai_client(daemon.socket) as c:
        yield c


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40}}, "required": ["name"]}
SCHEMAS = [
    pytest.param(
        {
            "type": "object",
            "properties": {
                "person": PERSON,
                "place": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                          "country": {"type": "string", "maxLength": 30}}, "required": ["city"]},
            },
            "required": ["person", "place"],
            "additionalProperties": False,
        },
        id="nested-objects",
    ),
    pytest.param(
        {"type": "object", "properties": {"people": {"type": "array", "items": PERSON, "minItems": 2,
         "maxItems": 3}}, "required": ["people"]},
        id="array-min-max-items",
    ),
    pytest.param(
        {"type": "object", "properties": {"field": {"enum": ["mathematics", "poetry", "medicine"]},
         "famous": {"type": "boolean"}}, "required": ["field", "famous"]},
        id="enum-and-boolean",
    ),
    pytest.param(
        {"type": "object", "properties": {"born": {"type": "integer", "minimum": 1800, "maximum": 1900},
         "age": {"type": "integer", "exclusiveMinimum": 0, "maximum": 120},
         "score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["born", "age", "score"]},
        id="integer-and-number-bounds",
    ),
    pytest.param(
        {"type": "object", "properties": {"birthday": {"type": "string", "format": "date"},
         "id": {"type": "string", "format": "uuid"}, "seen": {"type": "string", "format": "date-time"}},
         "required": ["birthday", "id", "seen"]},
        id="string-formats",
    ),
    pytest.param(
        {"$defs": {"Person": PERSON, "Work": {"type": "object", "properties": {"title": {"type": "string",
         "minLength": 3, "maxLength": 40}, "by": {"$ref": "#/$defs/Person"}}, "required": ["title", "by"]}},
         "type": "object", "properties": {"work": {"$ref": "#/$defs/Work"},
         "coauthor": {"anyOf": [{"$ref": "#/$defs/Person"}, {"type": "null"}]}},
         "required": ["work", "coauthor"]},
        id="refs-and-defs",
    ),
    pytest.param(
        {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string",
         "maxLength": 12}, "maxItems": 4}, "ranks": {"type": "array", "items": {"type": "integer",
         "minimum": 1, "maximum": 9}, "minItems": 1, "maxItems": 3}}, "required": ["tags", "ranks"]},
        id="string-and-integer-arrays",
    ),
]  # fmt: skip


def _validate(schema: dict[str, Any], text: str) -> Any:
    value = json.loads(text)
    errors = [str(e) for e in jsonschema_rs.validator_for(schema, validate_formats=True).iter_errors(value)]
    assert errors == [], (text, errors)
    return value


def _json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "facts", "schema": schema, "strict": True}}


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("schema", SCHEMAS)
def test_json_schema_answers_validate(client: Any, model: str, schema: dict[str, Any]) -> None:
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        response_format=_json_schema(schema),
        max_tokens=300,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    _validate(schema, choice.message.content)


@pytest.mark.parametrize("model", MODELS)
def test_sampled_answers_validate_too(client: Any, model: str) -> None:
    schema = SCHEMAS[3].values[0]
    for seed in range(3):
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPT}],
            response_format=_json_schema(schema),
            max_tokens=200,
            temperature=1.0,
            seed=seed,
        )
        assert reply.choices[0].finish_reason == "stop"
        _validate(schema, reply.choices[0].message.content)


@pytest.mark.parametrize("model", MODELS)
def test_streamed_answer_validates(client: Any, model: str) -> None:
    schema = SCHEMAS[0].values[0]
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        response_format=_json_schema(schema),
        max_tokens=300,
        temperature=0,
        stream=True,
    )
    parts, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "stop" and len([p for p in parts if p]) > 3  # really streamed
    _validate(schema, "".join(parts))


@pytest.mark.parametrize("model", MODELS)
def test_json_object_is_an_object(client: Any, model: str) -> None:
    """Free-form JSON lets a tiny model run on (a list of moons 1, 2, 3 ... 37 ...): the frequency
    penalty ends it, as docs/api.md advises; a schema with bounds does better."""
    reply = client.chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": 'Describe the planet Mars as a JSON object with the keys "name" and "moons".',
            }
        ],
        response_format={"type": "json_object"},
        max_tokens=150,
        temperature=0,
        frequency_penalty=1.0,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


class Work(BaseModel):
    title: str = Field(max_length=40)
    year: int = Field(ge=1800, le=1900)


class Facts(BaseModel):
    name: str = Field(max_length=40)
    field: Literal["mathematics", "poetry", "medicine"]
    works: list[Work] = Field(min_length=1, max_length=2)
    coauthor: str | None


@pytest.mark.parametrize("model", MODELS)
def test_the_sdk_parse_helper_with_a_pydantic_model(client: Any, model: str) -> None:
    completion = client.chat.completions.parse(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        response_format=Facts,
        max_tokens=300,
        temperature=0,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Facts) and 1 <= len(parsed.works) <= 2


def test_a_gbnf_grammar_constrains_chat_and_completions(client: Any) -> None:
    grammar = 'root ::= ("yes" | "no") "."'
    chat = client.chat.completions.create(
        model=CHAT_MODEL_ID,
        messages=[{"role": "user", "content": "Is Mars a planet?"}],
        max_tokens=8,
        extra_body={"grammar": grammar},
    )
    assert chat.choices[0].message.content in ("yes.", "no.")
    completion = client.completions.create(
        model=DEMO_MODEL_ID, prompt="Is Mars a planet?", max_tokens=8, extra_body={"grammar": grammar}
    )
    assert completion.choices[0].text in ("yes.", "no.")


REFUSED = [
    pytest.param({"response_format": _json_schema({"type": "string", "pattern": "^a$"})},
                 "response_format.json_schema.schema", "'pattern'", id="pattern"),
    pytest.param({"response_format": _json_schema({"oneOf": [{"type": "string"}]})},
                 "response_format.json_schema.schema", "'oneOf'", id="oneOf"),
    pytest.param({"response_format": _json_schema({"type": "string", "format": "email"})},
                 "response_format.json_schema.schema", "'format'", id="format-email"),
    pytest.param({"response_format": {"type": "json_schema",
                                      "json_schema": {"name": "bad name!", "schema": {}}}},
                 "response_format", "pattern", id="bad-name"),
    pytest.param({"response_format": {"type": "xml"}}, "response_format", "", id="unknown-type"),
    pytest.param({"grammar": "root ::= ("}, "grammar", "could not parse", id="grammar-syntax"),
    pytest.param({"grammar": 'root ::= "a"{3,1}'}, "grammar", "maximum below", id="grammar-bad-repeat"),
    pytest.param({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar",
                 "not both", id="grammar-and-format"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param", "message"), REFUSED)
def test_what_cannot_be_enforced_is_a_400_naming_it(
    client: Any, extra: dict[str, Any], param: str, message: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT_MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body=extra
        )
    error = caught.value.body
    assert error["param"].startswith(param) and message in error["message"], error
