"""End to end: chat, batching, cancellation and the queue on the real daemon, real Gemma 3 270M,
the official OpenAI client over the Unix socket."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.daemon import Daemon, openai_client, running_daemon, uds_client

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m-q4_k_m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Any]:
    with openai_client(daemon.socket) as c:
        yield c


def test_chat_on_the_base_model_returns_text(client: Any) -> None:
    result = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    choice = result.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason in {"stop", "length"}
    assert result.object == "chat.completion"
    assert result.usage is not None and result.usage.prompt_tokens > 10  # the template's turn markers
    assert 1 <= result.usage.completion_tokens <= 24


def test_chat_stream_matches_plain_and_reports_usage(client: Any) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": QUESTION, "max_tokens": 16, "temperature": 0}
    plain = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    deltas: list[str] = []
    roles: list[str | None] = []
    finishes: list[str | None] = []
    usage = None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles.append(choice.delta.role)
            deltas.append(choice.delta.content or "")
            finishes.append(choice.finish_reason)
    assert "".join(deltas) == plain
    assert roles[0] == "assistant"
    assert finishes[-1] in {"stop", "length"} and all(f is None for f in finishes[:-1])
    assert usage is not None and usage.completion_tokens >= 1


def test_chat_accepts_system_and_text_parts(client: Any) -> None:
    result = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]},
        ],
        max_completion_tokens=8,
        temperature=0,
    )
    assert result.choices[0].message.content


def test_chat_stop_string(client: Any) -> None:
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0)
    text = full.choices[0].message.content or ""
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    cut = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=40, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_seed_makes_sampling_repeatable(client: Any) -> None:

    def sample(seed: int) -> str:
        r = client.completions.create(
            model=MODEL, prompt="My favourite animal is", max_tokens=12, temperature=1.0, seed=seed
        )
        return str(r.choices[0].text)

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


PROMPTS = [
    "The capital of France is",
    "Water boils at",
    "1, 2, 3, 4,",
    "The largest planet in the solar system is",
    "The first man on the moon was",
    "A recipe for bread needs",
    "The speed of light is",
    "In 1492, Columbus",
]


@pytest.fixture(scope="module")
def eight_slots(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Daemon]:
    """8 slots: generation batches of 8 rows, where ggml would take its tiled K-quant matmul."""
    env = {"EDGE_AGENT_ENGINE__N_PARALLEL": "8"}
    with running_daemon(tmp_path_factory.mktemp("eight-slots"), gemma_path, env=env) as d:
        yield d


# Batch invariance (docs/engine.md): 4 rows take the plain quantized dot products and llamafile's
# sgemm; 8 rows are where ggml's tiled K-quant matmul (x86 AVX/AVX2/AVX512-VNNI) would start.
@pytest.mark.parametrize(
    ("daemon_fixture", "n_streams"),
    [("daemon", 4), ("eight_slots", 8)],
    ids=["4-slots-4-streams", "8-slots-8-streams"],
)
def test_concurrent_streams_each_equal_their_solo_output(
    request: pytest.FixtureRequest, daemon_fixture: str, n_streams: int
) -> None:
    d: Daemon = request.getfixturevalue(daemon_fixture)
    prompts = PROMPTS[:n_streams]
    with openai_client(d.socket) as client:

        def stream(prompt: str) -> str:
            parts: list[str] = []
            for chunk in client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True
            ):
                parts.extend(c.text for c in chunk.choices)
            return "".join(parts)

        solo = [stream(p) for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            together = list(pool.map(stream, prompts))
    assert together == solo
    assert len(set(solo)) == len(prompts)


def test_long_prompt_joining_a_running_stream_changes_neither_output(client: Any) -> None:
    # The long prompt's context passes 512 cells: decoded alone, ggml's flash attention would take
    # its split-KV path, and the plain one when the short stream shares the batch.
    long_prompt = "Notes on the history of computing. " * 80 + "In summary,"
    short_prompt = "The first man on the moon was"

    def stream(prompt: str, n: int) -> str:
        parts: list[str] = []
        for chunk in client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=n, temperature=0, stream=True
        ):
            parts.extend(c.text for c in chunk.choices)
        return "".join(parts)

    solo_short, solo_long = stream(short_prompt, 48), stream(long_prompt, 8)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        short = pool.submit(stream, short_prompt, 48)
        time.sleep(0.3)  # the short stream is generating when the long prompt arrives
        long = pool.submit(stream, long_prompt, 8)
        assert (short.result(), long.result()) == (solo_short, solo_long)


def test_second_turn_reuses_the_first_turns_cache(daemon: Daemon, client: Any) -> None:
    history: list[dict[str, str]] = [
        {"role": "user", "content": "Tell me about the history of the city of Paris. " * 60}
    ]
    first = client.chat.completions.create(
        model=MODEL, messages=history, max_tokens=16, temperature=0, extra_headers={"X-Request-Id": "turn-1"}
    )
    history += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "And what about Lyon?"},
    ]
    client.chat.completions.create(
        model=MODEL, messages=history, max_tokens=8, temperature=0, extra_headers={"X-Request-Id": "turn-2"}
    )
    logs = {
        line["request_id"]: line
        for line in daemon.log_lines()
        if line.get("event") == "generation" and line.get("request_id") in {"turn-1", "turn-2"}
    }
    first, second = logs["turn-1"], logs["turn-2"]
    assert second["prompt_tokens"] > first["prompt_tokens"] > 512
    # every whole 256-token prompt chunk of the first turn is reused (engine.prefill_chunk)
    assert second["reused_tokens"] == first["prompt_tokens"] // 256 * 256


@pytest.fixture(scope="module")
def fast_mode(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Daemon]:
    """The default engine mode (batch_invariant = false): token-exact prefix reuse."""
    env = {"EDGE_AGENT_ENGINE__BATCH_INVARIANT": "false"}
    with running_daemon(tmp_path_factory.mktemp("fast"), gemma_path, env=env) as d:
        yield d


def test_fast_mode_second_turn_reuses_every_token_of_the_first_prompt(fast_mode: Daemon) -> None:
    history: list[dict[str, str]] = [
        {"role": "user", "content": "Tell me about the history of the city of Paris. " * 30}
    ]
    with openai_client(fast_mode.socket) as client:
        first = client.chat.completions.create(
            model=MODEL, messages=history, max_tokens=8, temperature=0, extra_headers={"X-Request-Id": "f-1"}
        )
        history += [
            {"role": "assistant", "content": first.choices[0].message.content or ""},
            {"role": "user", "content": "And what about Lyon?"},
        ]
        second = client.chat.completions.create(
            model=MODEL, messages=history, max_tokens=4, temperature=0, extra_headers={"X-Request-Id": "f-2"}
        )
    logs = {
        line["request_id"]: line
        for line in fast_mode.log_lines()
        if line.get("event") == "generation" and line.get("request_id") in {"f-1", "f-2"}
    }
    # token-exact: the whole first prompt (and any of the answer that tokenizes the same) is reused
    assert logs["f-2"]["reused_tokens"] >= logs["f-1"]["prompt_tokens"]
    assert logs["f-2"]["reused_tokens"] < logs["f-2"]["prompt_tokens"]
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == logs["f-2"]["reused_tokens"]


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        pytest.param({}, 400, "messages", id="missing-messages"),
        pytest.param({"messages": []}, 400, "messages", id="empty-messages"),
        pytest.param({"messages": "hi"}, 400, "messages", id="messages-not-a-list"),
        pytest.param(
            {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", id="bad-role"
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            400,
            "messages.0.content",
            id="image-part",
        ),
        pytest.param(
            {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages", id="roles-must-alternate"
        ),
        pytest.param({"messages": QUESTION, "n": 2}, 400, "n", id="n-above-one"),
        pytest.param({"messages": QUESTION, "temperature": -1}, 400, "temperature", id="negative-temp"),
        pytest.param({"messages": QUESTION, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", id="five-stops"),
        pytest.param({"messages": QUESTION, "logit_bias": {"x": 1}}, 400, "logit_bias", id="bias-key"),
        pytest.param({"messages": QUESTION, "max_tokens": 5000}, 400, "max_tokens", id="context-overflow"),
        pytest.param({"messages": QUESTION, "model": "nope"}, 404, "model", id="unknown-model"),
    ],
)
def test_bad_chat_requests_get_openai_errors(
    daemon: Daemon, body: dict[str, Any], status: int, param: str
) -> None:
    with uds_client(daemon.socket) as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert err["param"] == param
    assert "Traceback" not in r.text


def test_context_overflow_in_chat_names_the_numbers(client: Any) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3000)
    assert "3000" in str(err.value) and "2048" in str(err.value)


# -- a daemon with one slot and a queue of one ----------------------------------------------------


@pytest.fixture(scope="module")
def one_slot(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Daemon]:
    env = {"EDGE_AGENT_ENGINE__N_PARALLEL": "1", "EDGE_AGENT_ENGINE__MAX_QUEUE": "1"}
    with running_daemon(tmp_path_factory.mktemp("one-slot"), gemma_path, env=env) as d:
        yield d


def queue_depth(d: Daemon) -> int:
    with uds_client(d.socket, timeout=10) as c:
        models = c.get("/admin/status").json()["models"]
    return int(sum(m["queue_depth"] for m in models))


def wait_idle(d: Daemon, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while queue_depth(d) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue_depth(d) == 0


def open_stream(d: Daemon, max_tokens: int, rid: str) -> tuple[httpx.Client, Any, Iterator[str]]:
    """Start a streaming completion and read until its first text chunk."""
    client = uds_client(d.socket)
    cm = client.stream(
        "POST",
        "/v1/completions",
        json={"prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True, "temperature": 0},
        headers={"X-Request-Id": rid},
    )
    response = cm.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
            break
    return client, cm, lines


def test_client_disconnect_cancels_and_frees_the_slot(one_slot: Daemon) -> None:
    wait_idle(one_slot)
    client, cm, _ = open_stream(one_slot, 1500, "gone-1")
    cm.__exit__(None, None, None)
    client.close()
    wait_idle(one_slot)
    with openai_client(one_slot.socket) as oa:
        result = oa.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    assert result.choices[0].text
    done = [
        line
        for line in one_slot.log_lines()
        if line.get("request_id") == "gone-1" and line.get("event", "").startswith("generation")
    ]
    assert done and done[-1]["event"] == "generation_cancelled"


def test_full_queue_is_refused_with_429_and_retry_after(one_slot: Daemon) -> None:
    wait_idle(one_slot)
    running = open_stream(one_slot, 1500, "busy-1")
    waiting_client = uds_client(one_slot.socket)
    body = {"prompt": "Hello", "max_tokens": 4, "stream": True}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiter = pool.submit(lambda: waiting_client.post("/v1/completions", json=body))
        deadline = time.monotonic() + 10
        while queue_depth(one_slot) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        with uds_client(one_slot.socket) as c:
            refused = c.post("/v1/completions", json=body)
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "overloaded"
        client, cm, _ = running
        cm.__exit__(None, None, None)
        client.close()
        assert waiter.result(timeout=120).status_code == 200
    waiting_client.close()
    wait_idle(one_slot)
