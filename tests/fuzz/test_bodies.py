"""Bad request bodies for the inference routes, with the real model: named cases, then hypothesis.

The daemon (tests/fuzz/conftest.py) has a 512-token context, so "longer than the context" is cheap.
Every answer to a bad body is a 4xx in the OpenAI error shape naming the parameter where it can;
no body, however generated, gets a 5xx or takes the daemon down.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.daemon import Daemon, uds_client
from tests.fuzz.rawhttp import RawResponse, assert_json_error

pytestmark = pytest.mark.model

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
LONG = "word " * 3000  # ~3000 tokens; the fuzz daemon's context is 512

VALID: dict[str, dict[str, Any]] = {
    COMPLETIONS: {"prompt": "Edge boxes are", "max_tokens": 2, "temperature": 0},
    CHAT: {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0},
    EMBEDDINGS: {"input": "edge"},
}


@pytest.fixture(scope="module")
def client(model_daemon: Daemon) -> Iterator[httpx.Client]:
    with uds_client(model_daemon.socket, timeout=60) as c:
        yield c


def _post(client: httpx.Client, path: str, raw: bytes) -> RawResponse:
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    return RawResponse(
        r.status_code, r.reason_phrase, {k.lower(): v for k, v in r.headers.items()}, r.content
    )


def _with(path: str, **changes: Any) -> bytes:
    body = {**VALID[path], **changes}
    return json.dumps({k: v for k, v in body.items() if v is not _DROP}).encode()


_DROP = object()

CASES = [
    pytest.param(
        COMPLETIONS, _with(COMPLETIONS, prompt=LONG), 400, "max_tokens", id="prompt-longer-than-context"
    ),
    pytest.param(
        COMPLETIONS, _with(COMPLETIONS, max_tokens=600), 400, "max_tokens", id="max-tokens-past-context"
    ),
    pytest.param(
        CHAT,
        _with(CHAT, messages=[{"role": "user", "content": LONG}]),
        400,
        "max_tokens",
        id="chat-longer-than-context",
    ),
    pytest.param(EMBEDDINGS, _with(EMBEDDINGS, input=LONG), 400, "input", id="embedding-longer-than-context"),
    pytest.param(COMPLETIONS, _with(COMPLETIONS, model="no-such-model"), 404, "model", id="unknown-model"),
    pytest.param(CHAT, _with(CHAT, model="no-such-model"), 404, "model", id="chat-unknown-model"),
    pytest.param(
        EMBEDDINGS, _with(EMBEDDINGS, model="no-such-model"), 404, "model", id="embed-unknown-model"
    ),
    pytest.param(
        COMPLETIONS, _with(COMPLETIONS, temperature=-0.1), 400, "temperature", id="temperature-negative"
    ),
    pytest.param(
        COMPLETIONS, _with(COMPLETIONS, temperature=2.5), 400, "temperature", id="temperature-too-high"
    ),
    pytest.param(
        COMPLETIONS,
        b'{"prompt": "x", "temperature": NaN}',
        400,
        "temperature",
        id="temperature-nan",
    ),
    pytest.param(
        COMPLETIONS,
        b'{"prompt": "x", "top_p": Infinity}',
        400,
        "top_p",
        id="top-p-infinite",
    ),
    pytest.param(COMPLETIONS, _with(COMPLETIONS, top_p=0), 400, "top_p", id="top-p-zero"),
    pytest.param(COMPLETIONS, _with(COMPLETIONS, min_p=1.5), 400, "min_p", id="min-p-above-one"),
    pytest.param(COMPLETIONS, _with(COMPLETIONS, top_k=-1), 400, "top_k", id="top-k-negative"),
    pytest.param(
        COMPLETIONS, _with(COMPLETIONS, repeat_penalty=0), 400, "repeat_penalty", id="repeat-penalty-zero"
    ),
    pytest.param(
        COMPLETIONS,
        _with(COMPLETIONS, presence_penalty=3),
        400,
        "presence_penalty",
        id="presence-penalty-high",
    ),
    pytest.param(COMPLETIONS, _with(COMPLETIONS, max_tokens=0), 400, "max_tokens", id="max-tokens-zero"),
    pytest.param(
        COMPLETIONS, _with(COMPLETIONS, max_tokens=2.5), 400, "max_tokens", id="max-tokens-fraction"
    ),
    pytest.param(
        COMPLETIONS, b'{"prompt": "x", "max_tokens": 1e400}', 400, "max_tokens", id="max-tokens-overflow"
    ),
    pytest.param(COMPLETIONS, _with(COMPLETIONS, n=2), 400, "n", id="n-two"),
    pytest.param(
        COMPLETIONS, _with(COMPLETIONS, stop=["a", "b", "c", "d", "e"]), 400, "stop", id="five-stops"
    ),
    pytest.param(
        COMPLETIONS, _with(COMPLETIONS, logit_bias={"x": 1}), 400, "logit_bias", id="bias-key-not-id"
    ),
    pytest.param(
        COMPLETIONS, _with(COMPLETIONS, logit_bias={"5": 1000}), 400, "logit_bias", id="bias-too-big"
    ),
    pytest.param(
        COMPLETIONS,
        _with(COMPLETIONS, logit_bias={"\u00b2": 1}),
        400,
        "logit_bias",
        id="bias-key-superscript",
    ),
    pytest.param(
        COMPLETIONS,
        _with(COMPLETIONS, logit_bias={"\u0663": 1}),
        400,
        "logit_bias",
        id="bias-key-arabic-digit",
    ),
    pytest.param(COMPLETIONS, _with(COMPLETIONS, max_tokens="2"), 400, "max_tokens", id="max-tokens-string"),
    pytest.param(COMPLETIONS, _with(COMPLETIONS, max_tokens=True), 400, "max_tokens", id="max-tokens-bool"),
    pytest.param(COMPLETIONS, _with(COMPLETIONS, prompt=_DROP), 400, "prompt", id="prompt-missing"),
    pytest.param(COMPLETIONS, _with(COMPLETIONS, prompt=["a", "b"]), 400, "prompt", id="two-prompts"),
    pytest.param(COMPLETIONS, _with(COMPLETIONS, prompt={"text": "x"}), 400, "prompt", id="prompt-object"),
    pytest.param(COMPLETIONS, _with(COMPLETIONS, stream="yes please"), 400, "stream", id="stream-not-bool"),
    pytest.param(CHAT, _with(CHAT, messages=[]), 400, "messages", id="no-messages"),
    pytest.param(CHAT, _with(CHAT, messages="hi"), 400, "messages", id="messages-string"),
    pytest.param(
        CHAT, _with(CHAT, messages=[{"role": "wizard", "content": "x"}]), 400, None, id="unknown-role"
    ),
    pytest.param(
        CHAT,
        _with(
            CHAT, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
        ),
        400,
        None,
        id="image-part",
    ),
    pytest.param(EMBEDDINGS, _with(EMBEDDINGS, input=[]), 400, "input", id="no-inputs"),
    pytest.param(EMBEDDINGS, _with(EMBEDDINGS, input=["x"] * 513), 400, "input", id="too-many-inputs"),
    pytest.param(EMBEDDINGS, _with(EMBEDDINGS, input=[[1, 2, 3]]), 400, "input", id="token-id-inputs"),
    pytest.param(EMBEDDINGS, _with(EMBEDDINGS, dimensions=3), 400, "dimensions", id="wrong-dimensions"),
    pytest.param(
        EMBEDDINGS, _with(EMBEDDINGS, encoding_format="hex"), 400, "encoding_format", id="bad-encoding"
    ),
    pytest.param(COMPLETIONS, b'{"prompt": "caf\xe9"}', 400, None, id="latin1-byte-in-prompt"),
    pytest.param(
        CHAT, b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}', 400, None, id="bad-utf8-in-chat"
    ),
    pytest.param(EMBEDDINGS, b'{"input": "\xff"}', 400, None, id="bad-utf8-in-input"),
    pytest.param(
        COMPLETIONS,
        b'{"prompt": "\\ud800 x", "max_tokens": 2}',
        400,
        None,
        id="lone-surrogate",
    ),
    pytest.param(
        CHAT,
        b'{"messages": [{"role": "user", "content": "\\udfff"}], "max_tokens": 2}',
        400,
        None,
        id="chat-lone-surrogate",
    ),
    pytest.param(EMBEDDINGS, b'{"input": "\\udfff"}', 400, None, id="embed-lone-surrogate"),
]


@pytest.mark.parametrize(("path", "raw", "status", "param"), CASES)
def test_bad_body_is_refused(
    client: httpx.Client, path: str, raw: bytes, status: int, param: str | None
) -> None:
    error = assert_json_error(_post(client, path, raw), status)
    if param is not None:
        assert error["param"] == param or (error["param"] or "").startswith(param), error


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        pytest.param(COMPLETIONS, _with(COMPLETIONS, prompt=LONG), id="completions"),
        pytest.param(CHAT, _with(CHAT, messages=[{"role": "user", "content": LONG}]), id="chat"),
    ],
)
def test_context_overflow_has_its_openai_code(client: httpx.Client, path: str, raw: bytes) -> None:
    error = assert_json_error(_post(client, path, raw), 400)
    assert error["code"] == "context_length_exceeded"
    assert "512" in error["message"]


@pytest.mark.parametrize(
    ("path", "changes"),
    [
        pytest.param(
            COMPLETIONS, {"max_tokens": 2.0, "top_k": 40.0, "seed": 7.0, "n": 1.0}, id="completions"
        ),
        pytest.param(CHAT, {"max_completion_tokens": 2.0, "top_k": 40.0, "seed": 7.0, "n": 1.0}, id="chat"),
        pytest.param(EMBEDDINGS, {"dimensions": 640.0}, id="embeddings"),
    ],
)
def test_integers_written_with_a_zero_fraction_are_integers(
    client: httpx.Client, path: str, changes: dict[str, Any]
) -> None:
    """JSON has one number type and JSON Schema's ``integer`` includes ``2.0``: the document and
    the validation agree (``"2"`` and ``true`` are refused, above)."""
    response = _post(client, path, json.dumps({**VALID[path], **changes}).encode())
    assert response.status == 200, response.body[:300]
    if path == EMBEDDINGS:
        assert len(response.json()["data"][0]["embedding"]) == 640
    else:
        assert 1 <= response.json()["usage"]["completion_tokens"] <= 2  # the 2.0 was honoured


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        pytest.param(
            COMPLETIONS, {"frobnicate": True, "nested": {"a": [1, 2]}}, "frobnicate", id="completions"
        ),
        pytest.param(CHAT, {"audio": {"voice": "alloy"}}, "audio", id="chat"),
        pytest.param(EMBEDDINGS, {"whatever": None}, "whatever", id="embeddings"),
    ],
)
def test_unknown_fields_are_refused_by_name(
    client: httpx.Client, path: str, extra: dict[str, Any], param: str
) -> None:
    error = assert_json_error(_post(client, path, json.dumps({**VALID[path], **extra}).encode()), 400)
    assert (error["param"], error["code"]) == (param, "unsupported_parameter")


# -- hypothesis: random damage to a valid body -------------------------------------------------

FIELDS = {
    COMPLETIONS: ["prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "stream",
                  "logit_bias", "echo", "n", "model", "stream_options", "frequency_penalty"],
    CHAT: ["messages", "max_tokens", "max_completion_tokens", "temperature", "stop", "stream", "model",
           "seed"],
    EMBEDDINGS: ["input", "model", "encoding_format", "dimensions"],
}  # fmt: skip

_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=24)
_junk = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        _text,
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_text, inner, max_size=3)),
    max_leaves=8,
)


@st.composite
def damaged_body(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(sorted(VALID)))
    body: dict[str, Any] = dict(VALID[path])
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        action = draw(st.sampled_from(["set", "drop", "extra"]))
        if action == "set":
            body[draw(st.sampled_from(FIELDS[path]))] = draw(_junk)
        elif action == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        else:
            body[draw(_text)] = draw(_junk)
    raw = json.dumps(body, allow_nan=True).encode()
    if draw(st.booleans()) and len(raw) > 2:  # sometimes: one stray byte (often invalid UTF-8 or JSON)
        at = draw(st.integers(min_value=1, max_value=len(raw) - 1))
        raw = raw[:at] + bytes([draw(st.integers(min_value=0x80, max_value=0xFF))]) + raw[at:]
    return path, raw


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(case=damaged_body())
def test_damaged_bodies_never_get_a_server_error(client: httpx.Client, case: tuple[str, bytes]) -> None:
    path, raw = case
    response = _post(client, path, raw)
    assert response.status in {200, 400, 404, 413, 429, 503}, (
        response.status,
        raw[:300],
        response.body[:300],
    )
    if response.status != 200:
        assert_json_error(response, response.status)
    elif (response.header("content-type") or "").startswith("application/json"):
        assert "error" not in response.json()
    else:
        assert response.body.rstrip().endswith(b"data: [DONE]")


def test_daemon_still_healthy(model_daemon: Daemon) -> None:
    assert model_daemon.proc.poll() is None
    assert model_daemon.health()["status"] == "ok"
