"""Chat templates are code: bounded in time and size (issue 15, low). Each case is refused with a
400 (BadRequest) within about the render deadline, instead of running on unbounded."""

from __future__ import annotations

import time

import pytest

from agent.engine.base import ChatMessage
from agent.engine.chat import CHATML_TEMPLATE, RENDER_MAX_S, ChatTemplate, render_chat
from agent.errors import BadRequest

HI = (ChatMessage("user", "hi"),)

CASES = [
    pytest.param("{{ 'x' * 50000000 }}", "over", id="string-times-fifty-million"),
    pytest.param("{{ messages[0].content * 10000000 }}", "over", id="message-content-multiplied"),
    pytest.param("{{ [1] * 100000000 }}", "over", id="list-multiplied"),
    pytest.param(
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x",
        "longer than",
        id="nested-loops-without-output",
    ),
    pytest.param(
        "{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "more than", id="output-too-large"
    ),
    pytest.param("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursed", id="endless-recursion"),
]


@pytest.mark.parametrize(("text", "says"), CASES)
def test_a_runaway_template_is_a_bad_request_within_the_deadline(text: str, says: str) -> None:
    started = time.monotonic()
    with pytest.raises(BadRequest) as info:
        render_chat(ChatTemplate("test", text, (), "", ""), HI)
    assert says in str(info.value)
    assert time.monotonic() - started < RENDER_MAX_S + 3


def test_a_normal_template_still_renders() -> None:
    out = render_chat(ChatTemplate("chatml", CHATML_TEMPLATE, (), "", ""), HI)
    assert "hi" in out and out.strip()
