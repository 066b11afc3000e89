"""``edge-agent chat [MODEL]``: an interactive, streaming terminal chat with the running daemon.

Like ``ollama run``: type a message, the answer streams as it is generated, the conversation is
kept and sent again each turn (the daemon reuses the cached prefix, docs/engine.md). ``/bye`` or
end of input (Ctrl-D) leaves, ``/clear`` forgets the conversation, ``/help`` lists the commands.
Ctrl-C while an answer streams stops that answer (the daemon frees its slot) and keeps what was
shown of it out of the history; Ctrl-C at the prompt leaves. Without ``MODEL`` the daemon picks its
chat default (the best served model whose task is chat). A model still loading is waited for.

Invariants: the history holds only complete turns (a user message and the whole answer to it);
an error from the daemon is printed and the conversation goes on without that turn.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from agent.errors import ClientError

HELP = "/bye leave, /clear forget the conversation, /help this list (Ctrl-D leaves, Ctrl-C stops an answer)"
PROMPT = ">>> "
LOAD_WAIT_S = 300.0


@dataclass
class ChatSession:
    """One conversation: reads lines with ``read``, writes the streamed answers to ``out``.

    ``client`` has ``stream_chat(body, wait_s=..., on_wait=...)`` yielding SSE chunks (real:
    :class:`agent.cli.client.LocalClient`)."""

    client: Any
    model: str | None = None
    system: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    out: TextIO = sys.stdout
    err: TextIO = sys.stderr
    history: list[dict[str, str]] = field(default_factory=list)
    served_by: str | None = None

    def messages(self, text: str) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.history, {"role": "user", "content": text}]

    def ask(self, text: str) -> str | None:
        """Send one user message and stream the answer; the answer, or None if it failed or was
        interrupted (the history is then unchanged)."""
        body: dict[str, Any] = {"messages": self.messages(text), **self.options}
        if self.model:
            body["model"] = self.model
        parts: list[str] = []
        chunks = self.client.stream_chat(body, wait_s=LOAD_WAIT_S, on_wait=self._waiting)
        try:
            for chunk in chunks:
                model = chunk.get("model")
                if model and model != self.served_by:
                    self.served_by = model
                    self.err.write(f"({model})\n")
                    self.err.flush()
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        parts.append(piece)
                        self.out.write(piece)
                        self.out.flush()
        except KeyboardInterrupt:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # closes the connection: the daemon cancels the generation
            self.out.write("\n")
            self.err.write("(stopped)\n")
            return None
        except ClientError as exc:
            self.out.write("\n" if parts else "")
            self.err.write(f"error: {exc}\n")
            return None
        self.out.write("\n")
        answer = "".join(parts)
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        return answer

    def _waiting(self, message: str) -> None:
        self.err.write(f"(waiting: {message})\n")
        self.err.flush()

    def run(self, read: Callable[[str], str]) -> int:
        """The loop: ``read(prompt)`` returns a line, raises EOFError at the end of input."""
        while True:
            try:
                line = read(PROMPT).strip()
            except (EOFError, KeyboardInterrupt):
                self.out.write("\n")
                return 0
            if not line:
                continue
            if line.startswith("/"):
                command = line.split()[0]
                if command in ("/bye", "/exit", "/quit"):
                    return 0
                if command == "/clear":
                    self.history.clear()
                    self.err.write("(conversation cleared)\n")
                elif command in ("/help", "/?"):
                    self.err.write(HELP + "\n")
                else:
                    self.err.write(f"unknown command {command}; {HELP}\n")
                continue
            self.ask(line)


def reader(stream: TextIO = sys.stdin) -> Callable[[str], str]:
    """``input()`` with line editing on a terminal; plain lines (no prompt) from a pipe."""
    if stream.isatty():
        with contextlib.suppress(ImportError):  # not on every platform
            import readline  # noqa: F401  (enables editing and history for input())
        return input

    def read(_prompt: str) -> str:
        line = stream.readline()
        if not line:
            raise EOFError
        return line

    return read


__all__ = ["HELP", "ChatSession", "reader"]
