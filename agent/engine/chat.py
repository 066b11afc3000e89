"""Chat messages -> one prompt string, through a Jinja chat template (pure, sandboxed).

Where the template comes from, first match wins:

1. the model manifest / ``[model] chat_template`` setting (:attr:`ModelInfo.chat_template`);
2. the GGUF header (``tokenizer.chat_template``);
3. a documented fallback chosen by architecture: Gemma's turn format for ``gemma*`` models (Gemma
   3 270M is a base model and its GGUF carries no template), a ChatML layout otherwise.

Invariants: templates run in Jinja's ``ImmutableSandboxedEnvironment`` (no attribute access to
Python internals, no mutation of the messages); a template's ``raise_exception(...)`` or any
rendering error becomes :class:`agent.errors.BadRequest` naming the cause; the rendered prompt is
never empty for a non-empty conversation; the fallback's turn markers are returned as stop strings,
so a base model that keeps writing turns is cut at the end of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NoReturn

from agent.engine.base import ChatMessage
from agent.errors import BadRequest

__all__ = [
    "CHATML_TEMPLATE",
    "GEMMA_TEMPLATE",
    "ChatTemplate",
    "TemplateSource",
    "pick_template",
    "render_chat",
]

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
"""Gemma's published turn format (system text folded into the first user turn)."""

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_FALLBACK_STOPS = {
    "gemma": ("<end_of_turn>", "<start_of_turn>"),
    "chatml": ("<|im_end|>", "<|im_start|>"),
}


@dataclass(frozen=True, slots=True)
class TemplateSource:
    """What a model offers: manifest template, GGUF template, architecture, special token texts."""

    manifest: str | None
    gguf: str | None
    architecture: str
    bos_token: str = ""
    eos_token: str = ""


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    source: str
    """``manifest``, ``gguf``, ``fallback:gemma`` or ``fallback:chatml``."""
    text: str
    stops: tuple[str, ...]
    bos_token: str
    eos_token: str


def pick_template(src: TemplateSource) -> ChatTemplate:
    """The template to use for a model (see the module docstring for the order)."""
    if src.manifest and src.manifest.strip():
        return ChatTemplate("manifest", src.manifest, (), src.bos_token, src.eos_token)
    if src.gguf and src.gguf.strip():
        return ChatTemplate("gguf", src.gguf, (), src.bos_token, src.eos_token)
    kind = "gemma" if src.architecture.lower().startswith("gemma") else "chatml"
    text = GEMMA_TEMPLATE if kind == "gemma" else CHATML_TEMPLATE
    return ChatTemplate(f"fallback:{kind}", text, _FALLBACK_STOPS[kind], src.bos_token, src.eos_token)


def _raise(message: str) -> NoReturn:
    raise BadRequest(f"messages: {message}", param="messages")


@lru_cache(maxsize=16)
def _compile(text: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = _raise
    try:
        return env.from_string(text)
    except TemplateError as exc:
        raise BadRequest(f"the model's chat template does not compile: {exc}") from None


def render_chat(template: ChatTemplate, messages: Sequence[ChatMessage]) -> str:
    """Render ``messages`` with the generation prompt appended; raise :class:`BadRequest`."""
    from jinja2 import TemplateError

    if not messages:
        raise BadRequest("messages: at least one message is required", param="messages")
    compiled = _compile(template.text)
    data = [{"role": m.role, "content": m.content} for m in messages]
    try:
        out = compiled.render(
            messages=data,
            add_generation_prompt=True,
            bos_token=template.bos_token,
            eos_token=template.eos_token,
        )
    except BadRequest:
        raise
    except (TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
        raise BadRequest(f"messages: the chat template failed: {exc}", param="messages") from None
    if not isinstance(out, str) or not out.strip():
        raise BadRequest("messages: the chat template rendered an empty prompt", param="messages")
    return out
