"""Tool calling on chat completions, in one generic format for every model (pure: no I/O).

No template in the demo store knows tools (SmolLM2's ChatML template has no tool syntax, Gemma 3
270M has no template at all), so tools reach the model as text and come back as JSON:

* the functions are listed in a system message (merged into the client's first system message),
  with the answer format ``{"tool_calls": [{"name": ..., "arguments": {...}}]}``;
* an assistant message that called tools is shown to the model in that format, and the results
  (``role: tool``) as a user message naming each function, so any template's role rules hold;
* ``tool_choice`` ``required`` or a named function constrains the answer by grammar to calls (of
  that function), so they work on every model, unlike llama.cpp's server, which answers in prose
  when the template has no tool syntax; ``auto`` allows plain text or calls (the grammar makes any
  answer that starts with ``{`` a valid call); ``none`` leaves the tools out and keeps the answer
  from starting with ``{`` (a model shown earlier calls would imitate them).

Invariants: every tool call returned has arguments (compact JSON text) that validate against its
function's ``parameters``, an ``id`` (``call_`` + 24 hex digits) and ``finish_reason:
"tool_calls"``; a stream sends each call's id and name once, then its arguments in pieces, as
OpenAI streams them; whatever cannot be done is a :class:`BadRequest` naming the field.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from agent.engine.base import ChatMessage
from agent.engine.grammar import tool_calls_grammar
from agent.errors import BadRequest

if TYPE_CHECKING:
    from agent.server.schemas import ChatBody

__all__ = ["CallDelta", "ToolCallStream", "ToolPlan", "new_call_id", "plan_tools"]

Mode = Literal["none", "auto", "required", "named"]
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
TEXT_GRAMMAR = r"""root ::= [ \t\r\n]* ([^{ \t\r\n] [\x00-\U0010FFFF]*)?
"""
"""Any answer that does not start with ``{``: ``tool_choice: "none"`` once tools are in play."""


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a chat request becomes: the messages the template renders, the answer's grammar."""

    messages: tuple[ChatMessage, ...]
    grammar: str | None
    mode: Mode


def _instructions(tools: list[dict[str, Any]], mode: Mode, named: str | None, parallel: bool) -> str:
    listing = json.dumps(tools, ensure_ascii=False)
    one = "one function" if not parallel else "one or more functions"
    text = (
        f"You can call functions. They are, in JSON:\n{listing}\n"
        f"To call {one}, answer with only a JSON object, in this format:\n"
        '{"tool_calls": [{"name": "<function name>", "arguments": {<its arguments>}}]}'
    )
    if mode == "auto":
        return text + "\nIf no function is needed, answer the user in plain text."
    if mode == "named":
        return text + f"\nCall the function {named} now."
    return text + "\nCall a function now."


def _call_json(name: str, arguments: str) -> dict[str, Any]:
    try:
        args: Any = json.loads(arguments)
    except ValueError:
        args = arguments
    return {"name": name, "arguments": args}


def _conversation(body: ChatBody) -> list[ChatMessage]:
    """The messages with tool calls and tool results written in the generic format."""
    names: dict[str, str] = {}
    out: list[ChatMessage] = []
    results: list[str] = []
    for i, message in enumerate(body.messages):
        if message.role == "tool":
            name = names.get(message.tool_call_id)
            if name is None:
                raise BadRequest(
                    f"messages.{i}.tool_call_id: {message.tool_call_id!r} answers no tool call of an "
                    "earlier assistant message",
                    param=f"messages.{i}.tool_call_id",
                )
            results.append(f"{name} returned: {message.text}")
            continue
        if results:
            out.append(ChatMessage("user", "Function results:\n" + "\n".join(results)))
            results = []
        if message.role == "assistant" and message.tool_calls:
            calls = [_call_json(c.function.name, c.function.arguments) for c in message.tool_calls]
            names.update({c.id: c.function.name for c in message.tool_calls})
            text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
            out.append(ChatMessage("assistant", f"{message.text}\n{text}" if message.text else text))
            continue
        role = "system" if message.role == "developer" else message.role
        out.append(ChatMessage(role, message.text))
    if results:
        out.append(ChatMessage("user", "Function results:\n" + "\n".join(results)))
    return out


def plan_tools(body: ChatBody) -> ToolPlan | None:
    """The tool plan of a chat request, or None when it neither offers tools nor carries tool
    messages (then the request goes as it is)."""
    has_history = any(m.role == "tool" or (m.role == "assistant" and m.tool_calls) for m in body.messages)
    tools = body.tools or []
    if not tools:
        if body.tool_choice is not None and body.tool_choice != "none":
            raise BadRequest("tool_choice: only allowed when tools are given", param="tool_choice")
        if body.parallel_tool_calls is not None:
            raise BadRequest(
                "parallel_tool_calls: only allowed when tools are given", param="parallel_tool_calls"
            )
        if not has_history:
            return None
    names = [t.function.name for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise BadRequest(
                f"tools.{i}.function.name: {name!r} is given twice", param=f"tools.{i}.function.name"
            )
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    named = None
    if isinstance(choice, str):
        mode: Mode = choice
    else:
        named = choice.function.name
        if named not in names:
            raise BadRequest(
                f"tool_choice.function.name: {named!r} is not among the tools ({', '.join(names)})",
                param="tool_choice.function.name",
            )
        mode = "named"
    messages = _conversation(body)
    if mode == "none":  # plain text: a model shown earlier calls would otherwise imitate them
        free = body.grammar is None and (body.response_format is None or body.response_format.type == "text")
        return ToolPlan(tuple(messages), TEXT_GRAMMAR if free else None, mode)
    if body.grammar is not None or (body.response_format is not None and body.response_format.type != "text"):
        param = "grammar" if body.grammar is not None else "response_format"
        raise BadRequest(f"{param}: not with tools (tool calls have their own grammar)", param=param)
    offered = [t for t in tools if named is None or t.function.name == named]
    specs = []
    listing = []
    for i, tool in enumerate(tools):
        params = tool.function.parameters if tool.function.parameters is not None else NO_PARAMETERS
        field_name = f"tools.{i}.function.parameters"
        if params.get("type") != "object":
            raise BadRequest(f'{field_name}: must be a JSON Schema with "type": "object"', param=field_name)
        if tool in offered:
            specs.append((tool.function.name, params, field_name))
            entry: dict[str, Any] = {"name": tool.function.name}
            if tool.function.description:
                entry["description"] = tool.function.description
            entry["parameters"] = params
            listing.append(entry)
    parallel = body.parallel_tool_calls is not False and mode != "named"
    grammar = tool_calls_grammar(tuple(specs), parallel=parallel, text=mode == "auto")
    system = _instructions(listing, mode, named, parallel)
    if messages and messages[0].role == "system":
        messages[0] = ChatMessage("system", f"{messages[0].content}\n\n{system}")
    else:
        messages.insert(0, ChatMessage("system", system))
    return ToolPlan(tuple(messages), grammar, mode)


@dataclass
class CallDelta:
    """A piece of one call: its id, type and name the first time, then argument text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
            out["function"] = {"name": self.name, "arguments": self.arguments}
        else:
            out["function"] = {"arguments": self.arguments}
        return out


_HEAD = re.compile(r'[\s},]*\{\s?"name"\s?:\s?("(?:[^"\\]|\\.)*")\s?,\s?"arguments"\s?:')
"""A call's head, after the previous call's closing brace and comma."""
_START = re.compile(r'\{\s?"tool_calls"\s?:\s?\[')


@dataclass
class ToolCallStream:
    """Answer text in, content or tool-call pieces out (see the module docstring).

    The text is a call list when it starts with ``{`` (the grammar then guarantees the format),
    plain content otherwise. ``feed`` returns ``(content, calls)`` for a piece of text. The first
    call's arguments are sent as the model writes them (less the whitespace between JSON tokens);
    a later call is sent whole once its arguments are complete, and dropped if it repeats an
    earlier call exactly (small models loop: ``get_time``, ``get_time``, ...).
    """

    calls: list[CallDelta] = field(default_factory=list)
    _buf: str = ""
    _kind: Literal["unknown", "text", "calls"] = "unknown"
    _pos: int = 0
    _depth: int = -1
    """-1: looking for the next call's head; else the nesting depth inside its arguments."""
    _in_string: bool = False
    _escape: bool = False
    _started: bool = False
    _name: str = ""
    _args: str = ""
    _first_done: bool = False
    dropped: int = 0
    """Calls left out because they repeated an earlier one."""

    @property
    def called(self) -> bool:
        return self._kind == "calls" and bool(self.calls)

    def feed(self, text: str) -> tuple[str, list[CallDelta]]:
        if self._kind == "text":
            return text, []
        self._buf += text
        if self._kind == "unknown":
            stripped = self._buf.lstrip()
            if not stripped:
                return "", []
            if not stripped.startswith("{"):
                self._kind = "text"
                out, self._buf = self._buf, ""
                return out, []
            self._kind = "calls"
        return "", self._scan()

    def _scan(self) -> list[CallDelta]:
        out: list[CallDelta] = []
        buf = self._buf
        if not self._started:
            start = _START.search(buf, self._pos)
            if start is None:
                return out
            self._started = True
            self._pos = start.end()
        while self._pos < len(buf):
            if self._depth < 0:
                head = _HEAD.match(buf, self._pos)
                if head is None:
                    return out
                self._name, self._args = json.loads(head.group(1)), ""
                if not self.calls:  # the first call streams from its head on
                    call = CallDelta(0, "", new_call_id(), self._name)
                    self.calls.append(call)
                    out.append(CallDelta(0, "", call.id, call.name))  # a copy: pieces add up
                self._pos = head.end()
                self._depth = 0
                continue
            piece, complete = self._arguments(buf)
            self._args += piece
            if not self._first_done:  # the first call: its arguments go out as they come
                if piece:
                    self.calls[0].arguments += piece
                    if out and out[-1].index == 0:
                        out[-1].arguments += piece
                    else:
                        out.append(CallDelta(0, piece))
                self._first_done = complete
            elif complete:
                if any(c.name == self._name and c.arguments == self._args for c in self.calls):
                    self.dropped += 1
                else:
                    call = CallDelta(len(self.calls), self._args, new_call_id(), self._name)
                    self.calls.append(call)
                    out.append(CallDelta(call.index, call.arguments, call.id, call.name))
        return out

    def _arguments(self, buf: str) -> tuple[str, bool]:
        """The argument text from the current position (whitespace between tokens left out), and
        whether the arguments are complete."""
        piece = []
        while self._pos < len(buf):
            c = buf[self._pos]
            self._pos += 1
            if self._in_string:
                piece.append(c)
                if self._escape:
                    self._escape = False
                elif c == "\\":
                    self._escape = True
                elif c == '"':
                    self._in_string = False
                continue
            if c in " \t\r\n":
                continue
            piece.append(c)
            if c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._depth = -1
                    return "".join(piece), True
        return "".join(piece), False

    def final_calls(self) -> list[dict[str, Any]]:
        """The calls in the shape of a non-streamed message's ``tool_calls``."""
        return [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in self.calls
        ]
