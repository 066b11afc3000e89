"""The tool-call stream parser (agent/server/tools.py), without a model: answers cut into pieces
of every size give the same calls, ids and names once, arguments as compact JSON, repeats left out."""

from __future__ import annotations

import json

import pytest

from agent.server.tools import ToolCallStream

CALLS = (
    '{ "tool_calls": [ {"name": "get_weather", "arguments": '
    '{ "city": "Pa ris \\"x\\"", "unit": "celsius" } },'
    ' {"name": "get_time", "arguments": {"city": "Paris", "tz": [1, {"a": "}"}]}},'
    ' {"name": "get_time", "arguments": {"city": "Paris", "tz": [1, {"a": "}"}]}} ] }'
)
EXPECTED = [
    ("get_weather", {"city": 'Pa ris "x"', "unit": "celsius"}),
    ("get_time", {"city": "Paris", "tz": [1, {"a": "}"}]}),
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 50, len(CALLS)])
def test_calls_are_the_same_whatever_the_pieces(size: int) -> None:
    stream = ToolCallStream()
    deltas = []
    for i in range(0, len(CALLS), size):
        content, pieces = stream.feed(CALLS[i : i + size])
        assert content == ""
        deltas += [d.json() for d in pieces]
    calls = stream.final_calls()
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == EXPECTED
    assert calls[0]["function"]["arguments"] == '{"city":"Pa ris \\"x\\"","unit":"celsius"}'
    assert stream.dropped == 1 and stream.called
    heads = [d for d in deltas if "id" in d]
    assert [h["function"]["name"] for h in heads] == ["get_weather", "get_time"]
    assert [h["id"] for h in heads] == [c["id"] for c in calls]
    rebuilt = {0: "", 1: ""}
    for d in deltas:
        rebuilt[d["index"]] += d["function"]["arguments"]
    assert [rebuilt[0], rebuilt[1]] == [c["function"]["arguments"] for c in calls]


@pytest.mark.parametrize("text", ["Hello {there}", "  It is sunny.", "\n"], ids=["text", "spaces", "blank"])
def test_text_that_does_not_start_with_a_brace_is_content(text: str) -> None:
    stream = ToolCallStream()
    out = "".join(stream.feed(c)[0] for c in text)
    assert out == ("" if not text.strip() else text) and not stream.called
