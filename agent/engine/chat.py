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

Bounded: a template (it comes from a signed manifest or a GGUF header, but is still code) renders
within :data:`RENDER_MAX_S` seconds and :data:`RENDER_MAX_CHARS` characters, or the request is
refused with a 400: ``range`` counts every iteration against the deadline (nested loops without
output included), ``*`` and ``+`` on strings and lists are checked for the size of their result
before they run, and the output is produced piecewise and checked as it grows. Engines call
:func:`render_chat` in a worker thread, never on the event loop.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator, Sequence
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


RENDER_MAX_S = 2.0
RENDER_MAX_CHARS = 4 << 20
_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("chat_render_deadline", default=0.0)


def _raise(message: str) -> NoReturn:
    raise BadRequest(f"messages: {message}", param="messages")


def _over_time() -> None:
    deadline = _DEADLINE.get()
    if deadline and time.monotonic() > deadline:
        _raise(f"the chat template ran longer than {RENDER_MAX_S:g} s")


def _bounded_range(*args: int) -> Iterator[int]:
    """``range`` for templates: each iteration is checked against the render's deadline."""
    if len(args) > 3 or not all(isinstance(a, int) for a in args):
        _raise("the chat template called range() with bad arguments")
    for i in range(*args):
        _over_time()
        yield i


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, str | list | tuple) else 0


@lru_cache(maxsize=16)
def _compile(text: str) -> Any:
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _over_time()
            if operator == "*":
                n = right if isinstance(right, int) else left if isinstance(left, int) else 0
                if max(_sized(left), _sized(right)) * max(n, 0) > RENDER_MAX_CHARS:
                    _raise(f"the chat template built a value over {RENDER_MAX_CHARS} characters")
            elif _sized(left) + _sized(right) > RENDER_MAX_CHARS:
                _raise(f"the chat template built a value over {RENDER_MAX_CHARS} characters")
            return super().call_binop(context, operator, left, right)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = _raise
    env.globals["range"] = _bounded_range
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
    token = _DEADLINE.set(time.monotonic() + RENDER_MAX_S)
    try:
        parts: list[str] = []
        size = 0
        for piece in compiled.generate(
            messages=data,
            add_generation_prompt=True,
            bos_token=template.bos_token,
            eos_token=template.eos_token,
        ):
            size += len(piece)
            if size > RENDER_MAX_CHARS:
                _raise(f"the chat template rendered more than {RENDER_MAX_CHARS} characters")
            _over_time()
            parts.append(piece)
        out = "".join(parts)
    except BadRequest:
        raise
    except RecursionError:
        raise BadRequest("messages: the chat template recursed too deeply", param="messages") from None
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, OverflowError, MemoryError) as exc:
        raise BadRequest(f"messages: the chat template failed: {exc}", param="messages") from None
    finally:
        _DEADLINE.reset(token)
    if not isinstance(out, str) or not out.strip():
        raise BadRequest("messages: the chat template rendered an empty prompt", param="messages")
    return out
