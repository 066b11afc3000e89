"""``logprobs`` / ``top_logprobs`` on chat and ``logprobs`` on completions, on the real daemon
(Gemma 3 270M) through the ``openai`` client: OpenAI's shapes, one entry per sampled token, the
model's own distribution (greedy picks the most likely token; probabilities sum to at most 1)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.daemon import Daemon, openai_client

pytestmark = pytest.mark.model

ASK = [{"role": "user", "content": "Name three planets."}]


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Iterator[Any]:
    with openai_client(daemon.socket) as c:
        yield c


def test_chat_logprobs_are_the_greedy_tokens_and_their_alternatives(client: Any) -> None:
    reply = client.chat.completions.create(
        model="", messages=ASK, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5
    )
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        top = entry.top_logprobs
        assert len(top) == 5 and [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0].token == entry.token and top[0].logprob == pytest.approx(entry.logprob)  # greedy
        assert entry.logprob <= 0 and sum(math.exp(t.logprob) for t in top) <= 1 + 1e-6
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    assert choice.logprobs.refusal is None


def test_streamed_chat_logprobs_equal_the_plain_ones(client: Any) -> None:
    kwargs = {"model": "", "messages": ASK, "max_tokens": 10, "temperature": 0, "logprobs": True,
              "top_logprobs": 2}  # fmt: skip
    plain = client.chat.completions.create(**kwargs).choices[0].logprobs.content
    streamed = [
        entry
        for chunk in client.chat.completions.create(stream=True, **kwargs)
        for choice in chunk.choices
        if choice.logprobs is not None
        for entry in choice.logprobs.content
    ]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in plain
    ]


def test_sampled_tokens_carry_their_own_logprob(client: Any) -> None:
    reply = client.chat.completions.create(
        model="", messages=ASK, max_tokens=12, temperature=1.0, seed=5, logprobs=True, top_logprobs=20
    )
    for entry in reply.choices[0].logprobs.content:
        alternatives = {t.token: t.logprob for t in entry.top_logprobs}
        if entry.token in alternatives:
            assert alternatives[entry.token] == pytest.approx(entry.logprob)
        else:
            assert entry.logprob <= min(alternatives.values()) + 1e-6


def test_no_logprobs_unless_asked(client: Any) -> None:
    reply = client.chat.completions.create(model="", messages=ASK, max_tokens=4)
    assert reply.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(client: Any) -> None:
    reply = client.completions.create(
        model="", prompt="Edge computing is", max_tokens=8, temperature=0, logprobs=3
    )
    choice = reply.choices[0]
    lp = choice.logprobs
    n = reply.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(n)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert (
            len(top) == 3
            and max(top.values()) == pytest.approx(logprob)
            and top[token] == pytest.approx(logprob)
        )
    stream = client.completions.create(
        model="", prompt="Edge computing is", max_tokens=8, temperature=0, logprobs=3, stream=True
    )
    streamed = [t for chunk in stream for c in chunk.choices if c.logprobs for t in c.logprobs.tokens]
    assert streamed == lp.tokens


BAD = [
    pytest.param("/chat/completions", {"messages": ASK, "top_logprobs": 2}, "top_logprobs",
                 id="top-without-logprobs"),
    pytest.param("/chat/completions", {"messages": ASK, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
                 id="top-21"),
    pytest.param("/completions", {"prompt": "x", "logprobs": 6}, "logprobs", id="completion-6"),
    pytest.param("/completions", {"prompt": "x", "logprobs": 1, "echo": True}, "logprobs", id="with-echo"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), BAD)
def test_bad_logprob_requests(client: Any, path: str, body: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post(path, body={"max_tokens": 2, **body}, cast_to=object)
    assert caught.value.body["param"] == param
