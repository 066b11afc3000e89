"""Chat templates: where they come from, how they render, how they fail (pure)."""

from __future__ import annotations

import pytest

from agent.engine.base import ChatMessage
from agent.engine.chat import (
    CHATML_TEMPLATE,
    GEMMA_TEMPLATE,
    TemplateSource,
    pick_template,
    render_chat,
)
from agent.errors import BadRequest

U = ChatMessage("user", "Hi there")
A = ChatMessage("assistant", "Hello!")
S = ChatMessage("system", "Be brief.")


def gemma(manifest: str | None = None, gguf: str | None = None) -> TemplateSource:
    return TemplateSource(manifest=manifest, gguf=gguf, architecture="gemma3", bos_token="<bos>")


@pytest.mark.parametrize(
    ("src", "source", "text"),
    [
        pytest.param(gemma("M {{ 1 }}", "G"), "manifest", "M {{ 1 }}", id="manifest-first"),
        pytest.param(gemma(None, "G"), "gguf", "G", id="gguf-second"),
        pytest.param(gemma("  ", None), "fallback:gemma", GEMMA_TEMPLATE, id="blank-manifest-ignored"),
        pytest.param(gemma(), "fallback:gemma", GEMMA_TEMPLATE, id="gemma-fallback"),
        pytest.param(TemplateSource(None, None, "llama"), "fallback:chatml", CHATML_TEMPLATE, id="chatml"),
    ],
)
def test_template_source_order(src: TemplateSource, source: str, text: str) -> None:
    t = pick_template(src)
    assert (t.source, t.text) == (source, text)


def test_gemma_fallback_renders_turns_and_generation_prompt() -> None:
    t = pick_template(gemma())
    out = render_chat(t, [S, U, A, ChatMessage("user", "  And now?  ")])
    assert out == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nAnd now?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert "<end_of_turn>" in t.stops


def test_chatml_fallback_renders() -> None:
    t = pick_template(TemplateSource(None, None, "qwen2"))
    assert render_chat(t, [U]) == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("template", "messages", "match"),
    [
        pytest.param(GEMMA_TEMPLATE, [], "at least one message", id="no-messages"),
        pytest.param(GEMMA_TEMPLATE, [A], "alternate", id="starts-with-assistant"),
        pytest.param(GEMMA_TEMPLATE, [U, U], "alternate", id="two-user-turns"),
        pytest.param("{{ messages[5].content }}", [U], "template failed", id="template-error"),
        pytest.param("{% for %}", [U], "does not compile", id="syntax-error"),
        pytest.param("{{ '' }}", [U], "empty prompt", id="renders-empty"),
        pytest.param("{{ messages.__class__.__mro__ }}", [U], "failed|empty", id="sandbox-blocks-dunder"),
        pytest.param("{% set x = messages.append(1) %}x", [U], "template failed", id="sandbox-immutable"),
    ],
)
def test_bad_conversations_and_templates_are_400(
    template: str, messages: list[ChatMessage], match: str
) -> None:
    t = pick_template(TemplateSource(template, None, "gemma3"))
    with pytest.raises(BadRequest, match=match) as err:
        render_chat(t, messages)
    assert err.value.status == 400
