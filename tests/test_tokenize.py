"""``POST /tokenize`` and ``POST /detokenize`` in llama.cpp's server's shapes, on the real daemon
(Gemma 3 270M), guarded like inference."""

from __future__ import annotations

from typing import Any

import pytest

from tests.daemon import Daemon, uds_client

pytestmark = pytest.mark.model


def _post(daemon: Daemon, path: str, body: dict[str, Any]) -> Any:
    with uds_client(daemon.socket) as client:
        return client.post(path, json=body)


def test_tokenize_and_detokenize_round_trip(daemon: Daemon) -> None:
    text = "Edge boxes run small models. Ünïcode ✓"
    ids = _post(daemon, "/tokenize", {"content": text}).json()["tokens"]
    assert ids and all(isinstance(i, int) for i in ids)
    assert _post(daemon, "/detokenize", {"tokens": ids}).json() == {"content": text}
    with_bos = _post(daemon, "/tokenize", {"content": text, "add_special": True}).json()["tokens"]
    assert with_bos[1:] == ids and len(with_bos) == len(ids) + 1
    pieces = _post(daemon, "/tokenize", {"content": text, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == ids
    assert "".join(p["piece"] for p in pieces if isinstance(p["piece"], str)) in text or any(
        isinstance(p["piece"], list) for p in pieces
    )


BAD = [
    pytest.param("/detokenize", {"tokens": [10**9]}, 400, "tokens", id="beyond-vocabulary"),
    pytest.param("/detokenize", {"tokens": [-1]}, 400, "tokens.0", id="negative-id"),
    pytest.param("/detokenize", {"tokens": ["a"]}, 400, "tokens.0", id="not-an-id"),
    pytest.param("/tokenize", {}, 400, "content", id="no-content"),
    pytest.param(
        "/tokenize", {"content": "x", "parse_special": True}, 400, "parse_special", id="unsupported"
    ),
    pytest.param("/tokenize", {"content": "x", "model": "nope"}, 404, "model", id="unknown-model"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_token_requests(daemon: Daemon, path: str, body: dict[str, Any], status: int, param: str) -> None:
    response = _post(daemon, path, body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param
