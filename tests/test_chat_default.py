"""A first conversation that works: a chat request naming no model goes to the instruction-tuned
SmolLM2 (the demo's chat model), completions keep Gemma; ``edge-agent chat`` streams a real
conversation in a terminal (a pty), keeps its history and leaves on ``/bye``."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from agent.demo import CHAT_MODEL_ID, DEMO_MODEL_ID
from tests.daemon import Daemon, demo_daemon, openai_client

pytestmark = [pytest.mark.model, pytest.mark.slow]

TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Daemon]:
    with demo_daemon(tmp_path_factory.mktemp("demo")) as d:
        yield d


def test_chat_without_a_model_goes_to_the_chat_model_and_completions_keep_the_default(daemon: Daemon) -> None:
    assert daemon.health()["default_model"] == DEMO_MODEL_ID
    with openai_client(daemon.socket) as client:
        chat = client.chat.completions.create(
            model="",  # the SDK requires the argument; empty means "the default", as no field does
            messages=[{"role": "user", "content": "Name three planets."}],
            max_tokens=40,
            temperature=0,
        )
        completion = client.completions.create(model="", prompt="Edge computing is", max_tokens=4)
    text = chat.choices[0].message.content or ""
    assert chat.model == CHAT_MODEL_ID
    assert len(text.split()) >= 3 and not any(t in text for t in TEMPLATE_TOKENS), text
    assert any(p in text for p in ("Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn")), text
    assert completion.model == DEMO_MODEL_ID


class Terminal:
    """A child process on a pseudo-terminal: type lines, read what it shows."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.screen = ""

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\r")

    def wait_for(self, text: str, timeout: float = 120.0, after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.screen[after:]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{text!r} not shown; the screen: {self.screen[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 1.0))
            if ready:
                try:
                    self.screen += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    if text not in self.screen[after:]:
                        raise
        return self.screen[after:]

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)


def test_edge_agent_chat_streams_a_conversation_in_a_terminal(daemon: Daemon) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    argv = [sys.executable, "-m", "agent.cli", "chat", "--socket", str(daemon.socket), "--temperature", "0"]
    term = Terminal([*argv, "--max-tokens", "40"], env)
    try:
        term.wait_for(">>> ")
        term.type("Name three planets.")
        start = len(term.screen)
        first = term.wait_for(">>> ", after=start)
        assert f"({CHAT_MODEL_ID})" in first
        assert any(p in first for p in ("Mercury", "Venus", "Earth", "Mars", "Jupiter")), first
        term.type("/help")
        assert "/bye" in term.wait_for(">>> ", after=len(term.screen))
        term.type("/bye")
        assert term.close() == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    turns = [line for line in daemon.log_lines() if line.get("event") == "generation"]
    assert turns[-1]["model"] == CHAT_MODEL_ID


def test_edge_agent_chat_keeps_the_history_and_reads_a_pipe(daemon: Daemon) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "chat", CHAT_MODEL_ID, "--socket", str(daemon.socket),
         "--temperature", "0", "--max-tokens", "24"],
        input="My name is Ada.\n/clear\nHi.\nWhat is my name?\n",
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "(conversation cleared)" in done.stderr
    prompts = [line["prompt_tokens"] for line in daemon.log_lines() if line.get("event") == "generation"][-3:]
    assert prompts[2] > prompts[1]  # the third turn carries the second one (not the cleared first)


def test_the_access_policy_sees_the_model_a_chat_really_goes_to(
    tmp_path_factory: pytest.TempPathFactory, gemma_path: Path
) -> None:
    """A role allowed to infer on Gemma only: a chat naming no model goes to SmolLM2 and is
    denied (the guard checks the chat default, not the completion default)."""
    state = tmp_path_factory.mktemp("policy")
    config = state / "config.toml"
    config.write_text(
        '[access.roles.app]\npermissions = [{ actions = ["infer"], models = ["gemma-*"] }]\n'
        '[[access.bindings]]\nrole = "app"\nuids = [0]\n'
    )
    with demo_daemon(state, env={"EDGE_AGENT_CONFIG": str(config)}) as d, openai_client(d.socket) as client:
        ask = [{"role": "user", "content": "Hi"}]
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="", messages=ask, max_tokens=2)
        assert (
            client.chat.completions.create(model=DEMO_MODEL_ID, messages=ask, max_tokens=2).model
            == DEMO_MODEL_ID
        )
        assert client.completions.create(model="", prompt="Hi", max_tokens=2).model == DEMO_MODEL_ID
