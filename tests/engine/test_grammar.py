"""JSON Schema -> GBNF (agent/engine/grammar.py), without a model.

The grammars of non-recursive schemas are turned into Python regular expressions here (the GBNF
we emit is literals, classes, groups, alternatives and repetitions), so what a grammar accepts can
be checked exhaustively: every integer of a range, every date of a year. What a real model writes
under these grammars is tested in tests/test_structured_output.py.
"""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

import jsonschema_rs
import pytest

from agent.engine import grammar
from agent.engine.grammar import SchemaError, check_gbnf, schema_grammar
from agent.errors import BadRequest

_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]|\{\d*,?\d*\}|[()|?*+]|[A-Za-z0-9-]+|\s+')


def to_regex(gbnf: str) -> re.Pattern[str]:
    """A regular expression accepting what the (non-recursive) grammar accepts."""
    rules = {}
    for line in gbnf.strip().splitlines():
        name, body = line.split(" ::= ", 1)
        rules[name] = body
    seen: list[str] = []

    def expand(name: str) -> str:
        assert name not in seen, f"recursive rule {name}"
        seen.append(name)
        out = []
        for tok in _TOKEN.findall(rules[name]):
            if tok.isspace():
                continue
            if tok.startswith('"'):
                out.append(re.escape(json.loads(tok)))
            elif tok.startswith("["):
                out.append(tok.encode().decode("unicode_escape") if "\\x" in tok else tok)
            elif re.fullmatch(r"[A-Za-z0-9-]+", tok) and tok in rules:
                out.append(f"(?:{expand(tok)})")
            elif tok == "(":
                out.append("(?:")
            else:
                out.append(tok)
        seen.pop()
        return "".join(out)

    return re.compile(expand("root"), re.DOTALL)


def accepts(schema: Any, text: str) -> bool:
    return to_regex(schema_grammar(schema)).fullmatch(text) is not None


INT_RANGES = [
    pytest.param({"minimum": 0, "maximum": 150}, id="0..150"),
    pytest.param({"minimum": -20, "maximum": 7}, id="-20..7"),
    pytest.param({"minimum": -120, "maximum": -3}, id="-120..-3"),
    pytest.param({"minimum": 17}, id="17.."),
    pytest.param({"maximum": -5}, id="..-5"),
    pytest.param({"exclusiveMinimum": 9, "exclusiveMaximum": 100}, id="exclusive-9..100"),
    pytest.param({"minimum": 1.5, "maximum": 99.5}, id="fractional-bounds"),
    pytest.param({"minimum": 5, "maximum": 5}, id="single"),
]


@pytest.mark.parametrize("bounds", INT_RANGES)
def test_integer_ranges_accept_exactly_the_integers_in_range(bounds: dict[str, float]) -> None:
    schema = {"type": "integer", **bounds}
    pattern = to_regex(schema_grammar(schema))
    validator = jsonschema_rs.validator_for(schema)
    for value in range(-400, 401):
        assert (pattern.fullmatch(str(value)) is not None) == validator.is_valid(value), value
    assert pattern.fullmatch("007") is None  # no leading zeros


NUMBER_RANGES = [
    pytest.param({"minimum": 0, "maximum": 1}, id="0..1"),
    pytest.param({"minimum": -3, "maximum": 2}, id="-3..2"),
    pytest.param({"minimum": -10, "maximum": -2}, id="-10..-2"),
    pytest.param({"minimum": 4}, id="4.."),
]


@pytest.mark.parametrize("bounds", NUMBER_RANGES)
def test_number_ranges_accept_only_numbers_in_range(bounds: dict[str, float]) -> None:
    schema = {"type": "number", **bounds}
    pattern = to_regex(schema_grammar(schema))
    validator = jsonschema_rs.validator_for(schema)
    texts = [f"{v / 4:g}" for v in range(-60, 61)] + ["1.0", "1.00", "1.5", "2.0001", "-0.5", "0.25", "-3.0"]
    for text in texts:
        if pattern.fullmatch(text):
            assert validator.is_valid(json.loads(text)), text
    assert any(pattern.fullmatch(t) for t in texts)


def test_dates_are_real_dates_and_times_are_rfc3339() -> None:
    pattern = to_regex(schema_grammar({"type": "string", "format": "date"}))
    day = datetime.date(2023, 1, 1)
    while day.year == 2023:
        assert pattern.fullmatch(f'"{day.isoformat()}"'), day
        day += datetime.timedelta(days=1)
    for bad in ('"2023-02-29"', '"2023-02-30"', '"2023-04-31"', '"2023-13-01"', '"2023-00-10"', '"2023-1-1"'):
        assert pattern.fullmatch(bad) is None, bad
    checker = jsonschema_rs.validator_for({"type": "string", "format": "date-time"}, validate_formats=True)
    dt = to_regex(schema_grammar({"type": "string", "format": "date-time"}))
    for good in ('"2024-05-01T13:45:00Z"', '"1999-12-31T23:59:59.123+05:30"'):
        assert dt.fullmatch(good) and checker.is_valid(json.loads(good))
    assert dt.fullmatch('"2024-05-01T24:00:00Z"') is None


OBJECTS = [
    pytest.param('{"a": 1, "b": "x"}', True, id="all"),
    pytest.param('{"a": 1}', True, id="required-only"),
    pytest.param('{"b": "x"}', False, id="required-missing"),
    pytest.param('{"a": 1, "c": true}', True, id="skip-middle-optional"),
    pytest.param('{"a": 1, "b": "x", "c": false}', True, id="all-three"),
    pytest.param('{"a": 1, "z": 2}', False, id="unknown-key"),
    pytest.param('{"a": 1,}', False, id="trailing-comma"),
    pytest.param('{ "a" : 1 , "b" : "x" }', True, id="single-spaces"),
    pytest.param('{"a":  1}', False, id="no-runaway-whitespace"),
    pytest.param('{"a": 1, "b": "line\nbreak"}', False, id="raw-control-char"),
    pytest.param('{"a": 1, "b": "tab\\tescaped"}', True, id="escaped-control-char"),
]


@pytest.mark.parametrize(("text", "ok"), OBJECTS)
def test_object_members_in_order_required_always_optional_maybe(text: str, ok: bool) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string"}, "c": {"type": "boolean"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    assert accepts(schema, text) is ok
    if ok:
        assert jsonschema_rs.validator_for(schema).is_valid(json.loads(text))


def test_all_optional_members_allow_the_empty_object() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "null"}, "y": {"enum": ["a", 2, None]}}}
    for text, ok in [
        ("{}", True),
        ('{"y": 2}', True),
        ('{"x": null, "y": "a"}', True),
        ('{"y": "b"}', False),
    ]:
        assert accepts(schema, text) is ok, text


ARRAYS = [
    pytest.param({"minItems": 2, "maxItems": 3}, 2, 3, id="2..3"),
    pytest.param({"minItems": 1}, 1, None, id="1.."),
    pytest.param({"maxItems": 2}, 0, 2, id="..2"),
    pytest.param({"maxItems": 0}, 0, 0, id="empty-only"),
]


@pytest.mark.parametrize(("bounds", "lo", "hi"), ARRAYS)
def test_array_sizes(bounds: dict[str, int], lo: int, hi: int | None) -> None:
    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, **bounds}
    for n in range(6):
        text = json.dumps(list(range(n)))
        assert accepts(schema, text) is (lo <= n and (hi is None or n <= hi)), text


def test_references_and_unions() -> None:
    schema = {
        "$defs": {"Colour": {"enum": ["red", "green"]}, "Pt": {"type": "object", "properties": {
            "x": {"type": "integer"}}, "required": ["x"]}},
        "type": "object",
        "properties": {"c": {"$ref": "#/$defs/Colour"},
                       "p": {"anyOf": [{"$ref": "#/$defs/Pt"}, {"type": "null"}]},
                       "u": {"type": ["string", "integer"], "maxLength": 2, "minimum": 0}},
        "required": ["c", "p", "u"],
    }  # fmt: skip
    for text, ok in [
        ('{"c": "red", "p": {"x": 3}, "u": "ab"}', True),
        ('{"c": "red", "p": null, "u": 7}', True),
        ('{"c": "blue", "p": null, "u": 7}', False),
        ('{"c": "red", "p": null, "u": "abc"}', False),
        ('{"c": "red", "p": null, "u": -1}', False),
    ]:
        assert accepts(schema, text) is ok, text


def test_recursive_references_compile() -> None:
    tree = {
        "$defs": {"Node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
            "type": "array", "items": {"$ref": "#/$defs/Node"}}}, "required": ["v", "kids"]}},
        "$ref": "#/$defs/Node",
    }  # fmt: skip
    text = schema_grammar(tree)
    assert text.startswith("root ::= node") and "node ::=" in text
    assert "<pending>" not in text


UNSUPPORTED = [
    pytest.param({"type": "string", "pattern": "^a+$"}, "pattern", id="pattern"),
    pytest.param({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "oneOf", id="oneOf"),
    pytest.param({"type": "integer", "multipleOf": 5}, "multipleOf", id="multipleOf"),
    pytest.param({"type": "array", "uniqueItems": True}, "uniqueItems", id="uniqueItems"),
    pytest.param({"type": "array", "prefixItems": [{"type": "string"}]}, "prefixItems", id="prefixItems"),
    pytest.param({"type": "string", "format": "email"}, "format", id="format-email"),
    pytest.param({"not": {"type": "string"}}, "not", id="not"),
    pytest.param({"if": {"type": "string"}}, "if", id="if"),
    pytest.param({"type": "number", "exclusiveMinimum": 0}, "exclusiveMinimum", id="exclusive-on-number"),
    pytest.param({"type": "number", "minimum": 0.5}, "minimum", id="fractional-bound-on-number"),
    pytest.param({"type": "object", "minProperties": 1}, "minProperties", id="minProperties"),
    pytest.param({"type": "object", "patternProperties": {}}, "patternProperties", id="patternProperties"),
    pytest.param({"$ref": "https://example.com/s.json"}, "$ref", id="remote-ref"),
    pytest.param({"$ref": "#/$defs/Nope"}, "$ref", id="dangling-ref"),
    pytest.param({"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "string"}},
                 "additionalProperties", id="extra-next-to-properties"),
    pytest.param({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf", id="allOf-two"),
    pytest.param({"type": "string", "nullable": True}, "nullable", id="openapi-nullable"),
    pytest.param({"type": "integer", "maxLength": 3}, "maxLength", id="keyword-of-another-type"),
    pytest.param({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required",
                 id="required-unknown"),
    pytest.param({"type": "array", "minItems": 3, "maxItems": 2}, "maxItems", id="max-below-min"),
    pytest.param({"type": "integer", "minimum": 5, "maximum": 4}, "maximum", id="empty-integer-range"),
    pytest.param({"type": "date"}, "type", id="unknown-type"),
    pytest.param({"type": "object", "properties": {"deep": {"type": "array", "items": {"type": "string",
                 "contentEncoding": "base64"}}}}, "contentEncoding", id="nested"),
]  # fmt: skip


@pytest.mark.parametrize(("schema", "keyword"), UNSUPPORTED)
def test_what_cannot_be_enforced_is_refused_by_name(schema: Any, keyword: str) -> None:
    with pytest.raises(SchemaError) as caught:
        schema_grammar(schema)
    assert caught.value.keyword == keyword
    assert f"'{keyword}'" in str(caught.value)
    assert caught.value.param == "response_format.json_schema.schema"
    assert caught.value.status == 400 and caught.value.code == "unsupported_schema"


def test_nested_refusal_names_where() -> None:
    with pytest.raises(SchemaError, match="#/properties/deep/items"):
        schema_grammar(UNSUPPORTED[-1].values[0])


def test_grammars_are_cached_per_schema() -> None:
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}}
    schema_grammar(schema)
    before = grammar._cached.cache_info().hits
    assert schema_grammar(json.loads(json.dumps(schema))) == schema_grammar(schema)
    assert grammar._cached.cache_info().hits == before + 2


def test_property_order_is_the_schema_order() -> None:
    text = schema_grammar(
        {"type": "object", "properties": {"zeta": {}, "alpha": {}}, "required": ["zeta", "alpha"]}
    )
    assert text.index('"\\"zeta\\""') < text.index('"\\"alpha\\""')


GBNF = [
    pytest.param('root ::= "a"{3,1}', "maximum below its minimum", id="max-below-min"),
    pytest.param('root ::= "a"{2001}', "beyond 2000", id="too-many"),
    pytest.param('root ::= "a"{x}', "malformed repetition", id="malformed"),
]


@pytest.mark.parametrize(("text", "match"), GBNF)
def test_gbnf_repetitions_llama_cpp_handles_badly_are_refused(text: str, match: str) -> None:
    with pytest.raises(BadRequest, match=match):
        check_gbnf(text)


def test_gbnf_braces_inside_literals_classes_and_comments_are_text() -> None:
    assert check_gbnf('root ::= "{3,1}" [{}] x{2,5} # {9,1}\n') is not None
