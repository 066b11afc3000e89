"""JSON Schema -> GBNF, for llama.cpp's grammar sampler (pure: no llama.cpp, no I/O).

Our own converter, not llama-cpp-python's ``json_schema_to_gbnf``: the one shipped with 0.3.36
ignores ``minimum``/``maximum``, lets raw control characters into strings (invalid JSON), accepts
dates like February 31st, treats ``oneOf`` as ``anyOf`` and fails with an ``AssertionError`` on a
schema it does not know. Here every keyword is either enforced or refused.

Invariants:

* Every text the grammar of a schema accepts parses with :func:`json.loads` and validates against
  that schema (formats included). Whatever cannot be enforced is refused: :class:`SchemaError`
  (a :class:`agent.errors.BadRequest`) names the keyword and where it is (a JSON pointer), never a
  silently weaker grammar.
* Annotations (``title``, ``description``, ``default``, ``examples``, ...) are accepted and do
  not constrain.
* Whitespace between tokens is at most one space (small models otherwise run away in
  whitespace); an object's properties come in the schema's order, required or not.
* :func:`schema_grammar` is cached per schema (its JSON text, key order kept: properties come
  in that order), :func:`json_object_grammar` is a constant.

Supported: ``type`` (one or a list), ``enum``, ``const``, ``anyOf``, ``allOf`` of one schema,
``$ref`` to ``#/...`` (``$defs``/``definitions``, recursion allowed); objects: ``properties``,
``required``, ``additionalProperties`` (``false``, or a schema/``true`` when no ``properties``
are declared); arrays: ``items``, ``minItems``, ``maxItems``; strings: ``minLength``,
``maxLength``, ``format`` (``date``, ``time``, ``date-time``, ``uuid``); integers: ``minimum``,
``maximum``, ``exclusiveMinimum``, ``exclusiveMaximum``; numbers: ``minimum`` and ``maximum``
when they are whole numbers.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from typing import Any

from agent.errors import BadRequest

__all__ = [
    "ANNOTATIONS",
    "MAX_REPETITION",
    "MAX_CALLS",
    "ToolSpec",
    "check_gbnf",
    "tool_calls_grammar",
    "JSON_OBJECT_GRAMMAR",
    "SUPPORTED",
    "SchemaError",
    "json_object_grammar",
    "schema_grammar",
]

ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$defs",
        "definitions",
    }
)
"""Keywords that do not constrain a value (``$defs`` only holds what ``$ref`` points to)."""

SUPPORTED = frozenset(
    {
        "type",
        "enum",
        "const",
        "anyOf",
        "allOf",
        "$ref",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
    }
)
FORMATS = ("date", "time", "date-time", "uuid")
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
MAX_DIGITS = 16
"""Digits of an unbounded integer part (and of a fraction): a model cannot write digits forever."""


class SchemaError(BadRequest):
    """A schema the grammar cannot enforce: names the keyword and the JSON pointer to it."""

    code = "unsupported_schema"

    def __init__(self, message: str, *, param: str, keyword: str | None = None) -> None:
        super().__init__(message, param=param)
        self.keyword = keyword


_PRIMITIVES = {
    "space": '" "?',
    "char": r'[^"\\\x7F\x00-\x1F] | [\\] (["\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "string": r'"\"" char* "\"" space',
    "integral-part": f"[0] | [1-9] [0-9]{{0,{MAX_DIGITS - 1}}}",
    "decimal-part": f"[0-9]{{1,{MAX_DIGITS}}}",
    "number": '("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? space',
    "integer": '("-"? integral-part) space',
    "boolean": '("true" | "false") space',
    "null": '"null" space',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" space ( string ":" space value ("," space string ":" space value)* )? "}" space',
    "array": '"[" space ( value ("," space value)* )? "]" space',
    "date": (
        '[0-9]{4} "-" ( ("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])'
        ' | ("0" [469] | "11") "-" ("0" [1-9] | [12] [0-9] | "30")'
        ' | "02" "-" ("0" [1-9] | "1" [0-9] | "2" [0-8]) )'
    ),
    "time": (
        '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,6})?'
        ' ("Z" | ("+" | "-") ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])'
    ),
    "date-time": 'date "T" time',
    "uuid": '[0-9a-f]{8} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{4} "-" [0-9a-f]{12}',
}
_DEPS = {
    "string": ("char", "space"),
    "number": ("integral-part", "decimal-part", "space"),
    "integer": ("integral-part", "space"),
    "boolean": ("space",),
    "null": ("space",),
    "value": ("object", "array", "string", "number", "boolean", "null"),
    "object": ("string", "value", "space"),
    "array": ("value", "space"),
    "date-time": ("date", "time"),
}


def _literal(text: str) -> str:
    """A GBNF string literal matching ``text`` exactly."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


# -- integer ranges ----------------------------------------------------------------------------


def _same_length(lo: str, hi: str) -> str:
    """Alternatives matching the decimal strings from ``lo`` to ``hi`` (same length, ``lo <= hi``)."""
    n = len(lo)
    if lo == hi:
        return _literal(lo)
    if set(lo) == {"0"} and set(hi) == {"9"}:
        return f"[0-9]{{{n}}}" if n > 1 else "[0-9]"
    if n == 1:
        return f"[{lo}-{hi}]"
    if lo[0] == hi[0]:
        return f"{_literal(lo[0])} ({_same_length(lo[1:], hi[1:])})"
    parts = [f"{_literal(lo[0])} ({_same_length(lo[1:], '9' * (n - 1))})"]
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}] [0-9]{{{n - 1}}}")
    parts.append(f"{_literal(hi[0])} ({_same_length('0' * (n - 1), hi[1:])})")
    return " | ".join(parts)


def _uint_range(lo: int, hi: int | None) -> str:
    """Non-negative integers from ``lo`` to ``hi`` (``None``: up to ``MAX_DIGITS`` digits), no
    leading zeros."""
    top = hi if hi is not None else 10**MAX_DIGITS - 1
    parts = []
    for digits in range(len(str(lo)), len(str(top)) + 1):
        a = lo if digits == len(str(lo)) else 10 ** (digits - 1)
        b = top if digits == len(str(top)) else 10**digits - 1
        if a <= b:
            parts.append(f"({_same_length(str(a), str(b))})")
    return " | ".join(parts)


def _int_range(lo: int | None, hi: int | None) -> str:
    """Integers in ``[lo, hi]`` (either side may be open), as JSON writes them."""
    parts = []
    if lo is None or lo < 0:  # negative values: magnitudes from max(1, -hi) to -lo
        small = 1 if hi is None or hi >= 0 else -hi
        parts.append(f'"-" ({_uint_range(small, None if lo is None else -lo)})')
    if hi is None or hi >= 0:
        parts.append(f"({_uint_range(max(lo or 0, 0), hi)})")
    return " | ".join(parts)


def _magnitude(lo: int, hi: int | None) -> str:
    """Non-negative numbers in ``[lo, hi]`` with an optional fraction (no exponent)."""
    fraction = f'("." [0-9]{{1,{MAX_DIGITS}}})?'
    zeros = f'("." "0"{{1,{MAX_DIGITS}}})?'
    if hi is None:
        return f"({_uint_range(lo, None)}) {fraction}"
    if lo == hi:
        return f"{_literal(str(hi))} {zeros}"
    return f"({_uint_range(lo, hi - 1)}) {fraction} | {_literal(str(hi))} {zeros}"


def _number_range(lo: int | None, hi: int | None) -> str:
    """Numbers in ``[lo, hi]`` (whole-number bounds, either side may be open)."""
    if lo is not None and lo >= 0:
        return _magnitude(lo, hi)
    if hi is not None and hi <= 0:
        return f'"-" ({_magnitude(-hi, None if lo is None else -lo)})'
    return f'"-" ({_magnitude(0, None if lo is None else -lo)}) | {_magnitude(0, hi)}'


# -- the converter -----------------------------------------------------------------------------


class _Converter:
    def __init__(self, root: Any, param: str, prefix: str = "", rules: dict[str, str] | None = None) -> None:
        self.root = root
        self.param = param
        self.prefix = prefix
        """Put before the name of every rule but the shared primitives (several schemas, one grammar)."""
        self.rules: dict[str, str] = {} if rules is None else rules
        self.refs: dict[str, str] = {}

    def fail(self, keyword: str | None, pointer: str, why: str) -> SchemaError:
        where = pointer if pointer.startswith("#") else f"#{pointer}"
        what = f"keyword {keyword!r} at {where}" if keyword else f"the schema at {where}"
        return SchemaError(f"{self.param}: {what}: {why}", param=self.param, keyword=keyword)

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            self.rules[name] = _PRIMITIVES[name]
            for dep in _DEPS.get(name, ()):
                self.primitive(dep)
        return name

    def rule(self, hint: str, body: str) -> str:
        """A named rule for ``body`` (reusing an identical one)."""
        for name, existing in self.rules.items():
            mine = name.startswith(self.prefix) and name not in self.refs.values()
            if existing == body and name not in _PRIMITIVES and mine:
                return name
        name = self.fresh(hint)
        self.rules[name] = body
        return name

    def fresh(self, hint: str) -> str:
        base = self.prefix + (re.sub(r"[^a-zA-Z0-9-]+", "-", hint).strip("-").lower() or "r")
        name, n = base, 1
        while name in self.rules or name in _PRIMITIVES or name == "root":
            n += 1
            name = f"{base}-{n}"
        return name

    def resolve(self, ref: str, pointer: str) -> Any:
        if not ref.startswith("#"):
            raise self.fail(
                "$ref", pointer, f"only references inside the schema (#/...) are supported, got {ref!r}"
            )
        node = self.root
        for raw in [p for p in ref[1:].split("/") if p]:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise self.fail("$ref", pointer, f"{ref!r} points nowhere in the schema")
        return node

    def visit(self, schema: Any, pointer: str) -> str:
        """The grammar expression (a rule name or alternatives) for ``schema``."""
        if schema is True or schema == {}:
            return self.primitive("value")
        if schema is False:
            raise self.fail(None, pointer, "false accepts no value")
        if not isinstance(schema, dict):
            raise self.fail(None, pointer, "a schema is an object or a boolean")
        for key in schema:
            if key not in SUPPORTED and key not in ANNOTATIONS:
                raise self.fail(key, pointer, f"not supported (supported: {', '.join(sorted(SUPPORTED))})")
        if "$ref" in schema:
            ref = schema["$ref"]
            if not isinstance(ref, str):
                raise self.fail("$ref", pointer, "must be a string")
            if set(schema) - ANNOTATIONS - {"$ref"}:
                other = sorted(set(schema) - ANNOTATIONS - {"$ref"})[0]
                raise self.fail(other, pointer, "is not supported next to $ref")
            if ref not in self.refs:
                name = self.fresh(ref.rsplit("/", 1)[-1] or "ref")
                self.refs[ref] = name
                self.rules[name] = "<pending>"  # a recursive reference finds the name meanwhile
                self.rules[name] = self.visit(self.resolve(ref, pointer), ref)
            return self.refs[ref]
        if "allOf" in schema:
            subs = schema["allOf"]
            if not isinstance(subs, list) or len(subs) != 1 or len(set(schema) - ANNOTATIONS) != 1:
                raise self.fail("allOf", pointer, "only an allOf of exactly one schema, alone, is supported")
            return self.visit(subs[0], f"{pointer}/allOf/0")
        if "anyOf" in schema:
            subs = schema["anyOf"]
            if not isinstance(subs, list) or not subs:
                raise self.fail("anyOf", pointer, "must be a non-empty list of schemas")
            if len(set(schema) - ANNOTATIONS) != 1:
                other = sorted(set(schema) - ANNOTATIONS - {"anyOf"})[0]
                raise self.fail(other, pointer, "is not supported next to anyOf (put it in each branch)")
            return " | ".join(f"({self.visit(s, f'{pointer}/anyOf/{i}')})" for i, s in enumerate(subs))
        if "const" in schema or "enum" in schema:
            values = [schema["const"]] if "const" in schema else schema["enum"]
            keyword = "const" if "const" in schema else "enum"
            if not isinstance(values, list) or not values:
                raise self.fail(keyword, pointer, "must be a non-empty list")
            if len(set(schema) - ANNOTATIONS - {"type"}) != 1:
                raise self.fail(keyword, pointer, "only type may stand next to it")
            return " | ".join(
                f"{_literal(json.dumps(v, ensure_ascii=False, separators=(',', ':')))} space" for v in values
            ) + self._uses("space")
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind or any(k not in TYPES for k in kind):
                raise self.fail("type", pointer, f"must name types among {', '.join(TYPES)}")
            for key in set(schema) - ANNOTATIONS - {"type"}:
                if not any(key in _OWN[k] for k in kind):
                    raise self.fail(key, pointer, f"is not supported for types {', '.join(kind)}")
            return " | ".join(
                f"({self.typed(k, {x: v for x, v in schema.items() if x in _OWN[k]}, pointer)})"
                for k in dict.fromkeys(kind)
            )
        if kind is None:
            constraints = set(schema) - ANNOTATIONS
            if constraints:
                raise self.fail(sorted(constraints)[0], pointer, "needs a type next to it")
            return self.primitive("value")
        if kind not in TYPES:
            raise self.fail("type", pointer, f"unknown type {kind!r}")
        return self.typed(kind, schema, pointer)

    def _uses(self, name: str) -> str:
        self.primitive(name)
        return ""

    def typed(self, kind: str, schema: dict[str, Any], pointer: str) -> str:
        for key in sorted(set(schema) - ANNOTATIONS - {"type"} - _OWN[kind]):
            raise self.fail(key, pointer, f"is not supported for type {kind}")
        if kind == "object":
            return self.object(schema, pointer)
        if kind == "array":
            return self.array(schema, pointer)
        if kind == "string":
            return self.string(schema, pointer)
        if kind in ("integer", "number"):
            return self.numeric(kind, schema, pointer)
        return self.primitive(kind)

    def object(self, schema: dict[str, Any], pointer: str) -> str:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties")
        if not isinstance(props, dict):
            raise self.fail("properties", pointer, "must be an object")
        if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
            raise self.fail("required", pointer, "must be a list of names")
        missing = [r for r in required if r not in props]
        if missing:
            raise self.fail("required", pointer, f"names {missing[0]!r}, which is not in properties")
        if not props:
            if extra is None or extra is True:
                return self.primitive("object")
            if extra is False:
                return self.rule("empty-object", '"{" space "}" space') + self._uses("space")
            value = self.visit(extra, f"{pointer}/additionalProperties")
            kv = self.rule("kv", f'string ":" space ({value})') + self._uses("string")
            return self.rule("map", f'"{{" space ({kv} ("," space {kv})*)? "}}" space')
        if extra not in (None, False):
            raise self.fail(
                "additionalProperties", pointer, "only false (or absent) is supported next to properties"
            )
        kvs: list[tuple[str, bool]] = []
        for name, sub in props.items():
            value = self.visit(sub, f"{pointer}/properties/{name}")
            kv = self.rule(
                f"{name}-kv", f'{_literal(json.dumps(name, ensure_ascii=False))} space ":" space ({value})'
            )
            kvs.append((kv, name in required))
        self.primitive("space")
        return self.rule("object", f'"{{" space {self._members(kvs)} "}}" space')

    def _members(self, kvs: list[tuple[str, bool]]) -> str:
        """Members in order: required ones always, optional ones maybe; commas only between."""
        if not kvs:
            return ""
        (first, needed), rest = kvs[0], kvs[1:]
        tail = self._after(rest)
        if needed:
            return f"{first} {tail}".strip()
        # the first member is optional: either it is there (then the rest follow with commas), or
        # the object starts with the next member
        without = self._members(rest)
        alternatives = [f"{first} {tail}".strip()]
        if without:
            alternatives.append(without)
        body = " | ".join(f"({a})" for a in alternatives)
        if all(not n for _, n in kvs):
            return f"({body})?"
        return f"({body})"

    def _after(self, kvs: list[tuple[str, bool]]) -> str:
        """Members that follow a present one: each preceded by a comma."""
        out = []
        for kv, needed in kvs:
            out.append(f'"," space {kv}' if needed else f'("," space {kv})?')
        return " ".join(out)

    def array(self, schema: dict[str, Any], pointer: str) -> str:
        lo, hi = schema.get("minItems", 0), schema.get("maxItems")
        for key, value in (("minItems", lo), ("maxItems", hi)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise self.fail(key, pointer, "must be a non-negative integer")
        if hi is not None and hi < lo:
            raise self.fail("maxItems", pointer, f"{hi} is below minItems {lo}")
        if (hi if hi is not None else lo) > 1000:
            raise self.fail("minItems" if hi is None else "maxItems", pointer, "at most 1000 is supported")
        item = self.visit(schema.get("items", True), f"{pointer}/items")
        item = self.rule("item", item) if " " in item else item
        self.primitive("space")
        if hi == 0:
            return self.rule("empty-array", '"[" space "]" space')
        if lo == 0:
            more = f'("," space {item})*' if hi is None else f'("," space {item}){{0,{hi - 1}}}'
            body = f'"[" space ({item} {more})? "]" space'
        else:
            more = (
                f'("," space {item}){{{lo - 1},}}'
                if hi is None
                else f'("," space {item}){{{lo - 1},{hi - 1}}}'
            )
            body = f'"[" space {item} {more} "]" space'
        return self.rule("array", body)

    def string(self, schema: dict[str, Any], pointer: str) -> str:
        fmt = schema.get("format")
        if fmt is not None:
            if fmt not in FORMATS:
                raise self.fail(
                    "format", pointer, f"{fmt!r} is not supported (supported: {', '.join(FORMATS)})"
                )
            if "minLength" in schema or "maxLength" in schema:
                raise self.fail(
                    "minLength" if "minLength" in schema else "maxLength", pointer, "not with format"
                )
            self.primitive(fmt)
            self.primitive("space")
            return self.rule(f"{fmt}-string", f'"\\"" {fmt} "\\"" space')
        lo, hi = schema.get("minLength", 0), schema.get("maxLength")
        for key, value in (("minLength", lo), ("maxLength", hi)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise self.fail(key, pointer, "must be a non-negative integer")
        if hi is not None and hi < lo:
            raise self.fail("maxLength", pointer, f"{hi} is below minLength {lo}")
        if lo == 0 and hi is None:
            return self.primitive("string")
        self.primitive("char")
        self.primitive("space")
        count = f"{{{lo},}}" if hi is None else f"{{{lo},{hi}}}"
        return self.rule("string", f'"\\"" char{count} "\\"" space')

    def numeric(self, kind: str, schema: dict[str, Any], pointer: str) -> str:
        bounds: dict[str, float] = {}
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in schema:
                value = schema[key]
                if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                    raise self.fail(key, pointer, "must be a number")
                bounds[key] = value
        if not bounds:
            return self.primitive(kind)
        lo: int | None = None
        hi: int | None = None
        if kind == "integer":
            candidates_lo = [math.ceil(bounds["minimum"])] if "minimum" in bounds else []
            if "exclusiveMinimum" in bounds:
                candidates_lo.append(math.floor(bounds["exclusiveMinimum"]) + 1)
            candidates_hi = [math.floor(bounds["maximum"])] if "maximum" in bounds else []
            if "exclusiveMaximum" in bounds:
                candidates_hi.append(math.ceil(bounds["exclusiveMaximum"]) - 1)
            lo = max(candidates_lo) if candidates_lo else None
            hi = min(candidates_hi) if candidates_hi else None
            if lo is not None and hi is not None and hi < lo:
                raise self.fail("maximum", pointer, "no integer lies between the bounds")
            for b in (lo, hi):
                if b is not None and abs(b) >= 10 ** (MAX_DIGITS - 1):
                    raise self.fail(
                        "minimum" if b == lo else "maximum", pointer, f"bounds beyond ±10^{MAX_DIGITS - 1}"
                    )
            self.primitive("space")
            return self.rule("integer", f"({_int_range(lo, hi)}) space")
        for key, value in bounds.items():
            if key.startswith("exclusive"):
                raise self.fail(key, pointer, "is supported on integers only")
            if value != int(value) or abs(value) >= 10 ** (MAX_DIGITS - 1):
                raise self.fail(
                    key, pointer, f"only whole-number bounds are supported on numbers, got {value}"
                )
        lo = int(bounds["minimum"]) if "minimum" in bounds else None
        hi = int(bounds["maximum"]) if "maximum" in bounds else None
        if lo is not None and hi is not None and hi < lo:
            raise self.fail("maximum", pointer, f"{hi} is below minimum {lo}")
        self.primitive("space")
        return self.rule("number", f"({_number_range(lo, hi)}) space")

    def grammar(self) -> str:
        root = self.visit(self.root, "")
        lines = [f"root ::= {root}"]
        lines += [f"{name} ::= {body}" for name, body in self.rules.items()]
        return "\n".join(lines) + "\n"


_OWN: dict[str, set[str]] = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"minLength", "maxLength", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum"},
    "boolean": set(),
    "null": set(),
}
"""The keywords each type takes (exclusive bounds on numbers are refused with a reason)."""


@lru_cache(maxsize=256)
def _cached(canonical: str, param: str) -> str:
    try:
        return _Converter(json.loads(canonical), param).grammar()
    except RecursionError:
        raise SchemaError(f"{param}: the schema is nested too deeply", param=param) from None


def schema_grammar(schema: Any, param: str = "response_format.json_schema.schema") -> str:
    """The GBNF grammar of ``schema`` (cached per schema); :class:`SchemaError` names what is not
    supported, ``param`` is the request field it came from."""
    return _cached(json.dumps(schema, ensure_ascii=False), param)  # key order matters: properties


JSON_OBJECT_GRAMMAR = _Converter({"type": "object"}, "response_format").grammar()
"""``response_format: {"type": "json_object"}``: any JSON object."""


def json_object_grammar() -> str:
    return JSON_OBJECT_GRAMMAR


MAX_CALLS = 4
"""Calls in one answer at most (a small model may otherwise repeat calls until ``max_tokens``)."""
ToolSpec = tuple[str, Any, str]
"""A function a model may call: ``(name, parameters schema, request field of the schema)``."""


def tool_calls_grammar(tools: tuple[ToolSpec, ...], *, parallel: bool, text: bool) -> str:
    """The grammar of an answer in the generic tool-call format (docs/api.md, "Tool calls"):
    ``{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}``, each call's arguments valid for
    its function (one call only unless ``parallel``, then ``MAX_CALLS`` at most); with ``text``,
    plain text not starting with ``{`` is allowed instead. Cached; :class:`SchemaError` names the
    tool's bad keyword."""
    key = json.dumps([[n, s, p] for n, s, p in tools], ensure_ascii=False)
    return _tool_grammar(key, parallel, text)


@lru_cache(maxsize=128)
def _tool_grammar(key: str, parallel: bool, text: bool) -> str:
    rules: dict[str, str] = {}
    calls = []
    for i, (name, schema, param) in enumerate(json.loads(key)):
        conv = _Converter(schema, param, prefix=f"t{i}-", rules=rules)
        try:
            arguments = conv.visit(schema, "")
        except RecursionError:
            raise SchemaError(f"{param}: the schema is nested too deeply", param=param) from None
        head = _literal(json.dumps(name, ensure_ascii=False))
        rules[f"t{i}-call"] = (
            f'"{{" space "\\"name\\"" space ":" space {head} space "," space '
            f'"\\"arguments\\"" space ":" space ({arguments}) "}}" space'
        )
        calls.append(f"t{i}-call")
    conv = _Converter({}, "tools", rules=rules)
    conv.primitive("space")
    many = f'("," space call){{0,{MAX_CALLS - 1}}}' if parallel else ""
    lines = [
        "root ::= calls" + (" | text" if text else ""),
        f'calls ::= "{{" space "\\"tool_calls\\"" space ":" space "[" space call {many} "]" space "}}" space',
        f"call ::= {' | '.join(calls)}",
    ]
    if text:
        lines.append(r"text ::= [ \t\r\n]* ([^{ \t\r\n] [\x00-\U0010FFFF]*)?")
    lines += [f"{n} ::= {b}" for n, b in rules.items()]
    return "\n".join(lines) + "\n"


MAX_REPETITION = 2000
"""The largest bound of a ``{m,n}`` repetition (llama.cpp refuses more, 'sane defaults')."""
_REPEAT = re.compile(r"\{\s*(\d*)\s*(,?)\s*(\d*)\s*\}")


def check_gbnf(text: str, param: str = "grammar") -> str:
    """Refuse, before llama.cpp parses it, what its parser handles badly: a ``{m,n}`` repetition
    with ``m > n`` makes llama.cpp 0.3.36 allocate gigabytes for many seconds before failing.
    Scans outside string literals, character classes and comments; returns ``text``."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#":  # a comment runs to the end of the line
            while i < n and text[i] not in "\r\n":
                i += 1
        elif c in '"[':
            close = '"' if c == '"' else "]"
            i += 1
            while i < n and text[i] != close:
                i += 2 if text[i] == "\\" else 1
        elif c == "{":
            match = _REPEAT.match(text, i)
            if match is None:
                raise BadRequest(f"{param}: malformed repetition at offset {i}", param=param)
            lo_text, comma, hi_text = match.groups()
            lo = int(lo_text) if lo_text else 0
            hi = int(hi_text) if hi_text else (None if comma else lo)
            if max(lo, hi or 0) > MAX_REPETITION:
                raise BadRequest(f"{param}: repetition {match.group(0)} beyond {MAX_REPETITION}", param=param)
            if hi is not None and hi < lo:
                raise BadRequest(
                    f"{param}: repetition {match.group(0)} has its maximum below its minimum", param=param
                )
            i = match.end() - 1
        i += 1
    return text
