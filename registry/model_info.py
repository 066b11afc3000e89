"""Build a model's signed manifest from the file itself: the GGUF header or the ONNX graph.

GGUF facts come from :mod:`registry.gguf_info` (the project's one GGUF reader). ONNX facts come
from the graph read with ``onnx`` (weights are not materialised beyond their shapes): graph inputs
(not initializers), outputs, the default-domain opset, the parameter count (sum of initializer
elements), whether it is quantized (integer weights or quantization operators), and for
transformer encoders the layer count, embedding width and maximum positions when the initializer
names reveal them (``...layer.<n>...``, ``...position_embeddings...``).

Invariant: the manifest's ``sha256``/``chunk_sha256``/``file_size`` are computed from the same
bytes that are published (one pass over the file by :func:`registry.metadata.digest_file`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from registry.exceptions import ManifestError, Reason, RegistryError
from registry.gguf_info import read_gguf_info
from registry.metadata import DEFAULT_CHUNK_SIZE, FileDigest, ModelManifest, Task, digest_file

QUANT_OPS = frozenset(
    {
        "DynamicQuantizeLinear",
        "MatMulInteger",
        "QLinearMatMul",
        "QuantizeLinear",
        "DequantizeLinear",
        "ConvInteger",
        "QLinearConv",
        "MatMulNBits",
        "DynamicQuantizeMatMul",
    }
)
_INT_TYPES = frozenset({2, 3, 21, 22})  # onnx TensorProto UINT8, INT8, UINT4, INT4


@dataclass(frozen=True, slots=True)
class OnnxGraphInfo:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    opset: int | None
    parameters: int
    quantized: bool
    n_layers: int | None
    embedding_length: int | None
    context_length: int | None
    vocab_size: int | None
    producer: str
    """The model family when the weight names reveal it (``bert``), else the exporter's name."""


def model_format(path: Path) -> str:
    """``gguf`` or ``onnx`` by magic bytes (GGUF) or suffix (ONNX protobuf has no magic)."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except FileNotFoundError:
        raise RegistryError(f"{path}: no such file", reason=Reason.MISSING) from None
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read: {exc.strerror}", reason=Reason.IO_ERROR) from None
    if magic == b"GGUF":
        return "gguf"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    raise ManifestError(f"{path}: neither a GGUF file (magic GGUF) nor an .onnx file")


def read_onnx_info(path: Path) -> OnnxGraphInfo:
    """Inspect an ONNX graph; raise :class:`ManifestError` if it is not a valid model."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ManifestError(f"{path}: not a valid ONNX model: {exc}") from None
    graph = model.graph
    init_names = {i.name for i in graph.initializer}
    inputs = tuple(i.name for i in graph.input if i.name not in init_names)
    outputs = tuple(o.name for o in graph.output)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    parameters = 0
    layers: set[int] = set()
    embedding = context = vocab = None
    quantized = any(n.op_type in QUANT_OPS for n in graph.node)
    for init in graph.initializer:
        parameters += math.prod(init.dims) if init.dims else 1
        if init.data_type in _INT_TYPES and len(init.dims) >= 2:
            quantized = True
        m = re.search(r"layers?\.(\d+)\.", init.name)
        if m:
            layers.add(int(m.group(1)))
        if len(init.dims) == 2 and re.search(r"position_embeddings\.weight(_q|_quantized)?$", init.name):
            context, embedding = int(init.dims[0]), int(init.dims[1])
        if len(init.dims) == 2 and re.search(r"word_embeddings\.weight(_q|_quantized)?$", init.name):
            vocab = int(init.dims[0])
    if embedding is None and graph.output:
        dims = graph.output[0].type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value"):
            embedding = int(dims[-1].dim_value)
    if not inputs or not outputs:
        raise ManifestError(f"{path}: ONNX graph has no inputs or no outputs")
    return OnnxGraphInfo(
        inputs=inputs,
        outputs=outputs,
        opset=opset,
        parameters=parameters,
        quantized=quantized,
        n_layers=len(layers) or None,
        embedding_length=embedding,
        context_length=context,
        vocab_size=vocab,
        producer=_family(init_names) or model.producer_name or "onnx",
    )


def _family(initializer_names: set[str]) -> str | None:
    """Recognise common encoder families by their weight names (BERT-style sentence encoders)."""
    if any("embeddings.word_embeddings" in n for n in initializer_names) and any(
        "encoder.layer." in n for n in initializer_names
    ):
        return "bert"
    return None


def build_manifest(
    path: Path,
    *,
    model_id: str,
    version: str = "1",
    task: Task | None = None,
    chat_template: str | None = None,
    licence: str | None = None,
    family: str | None = None,
    min_cpu_features: tuple[str, ...] = (),
    companions: tuple[str, ...] = (),
    file_name: str | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    digest: FileDigest | None = None,
) -> ModelManifest:
    """Read ``path``, hash it, and return its manifest (``file_name`` defaults to
    ``model.gguf``/``model.onnx``)."""
    fmt = model_format(path)
    digest = digest or digest_file(path, chunk_size)
    fields: dict[str, Any]
    if fmt == "gguf":
        info = read_gguf_info(path)
        template = chat_template or info.chat_template
        meta_licence = info.metadata.get("general.license")
        fields = {
            "family": family or info.architecture,
            "parameters": info.parameter_count,
            "quantization": info.quantization,
            "task": task or ("chat" if template else "completion"),
            "context_length": info.context_length or None,
            "n_layers": info.block_count or None,
            "n_heads": info.head_count or None,
            "n_kv_heads": (max(info.head_count_kv) if info.head_count_kv else None) or None,
            "embedding_length": info.embedding_length or None,
            "sliding_window": info.sliding_window,
            "vocab_size": info.vocab_size or None,
            "chat_template": template,
            "licence": licence
            or (meta_licence if isinstance(meta_licence, str) and meta_licence else "unknown"),
        }
    else:
        onnx_info = read_onnx_info(path)
        fields = {
            "family": family or onnx_info.producer,
            "parameters": onnx_info.parameters,
            "quantization": "int8" if onnx_info.quantized else "fp32",
            "task": task or "embedding",
            "context_length": onnx_info.context_length,
            "n_layers": onnx_info.n_layers,
            "embedding_length": onnx_info.embedding_length,
            "vocab_size": onnx_info.vocab_size,
            "chat_template": chat_template,
            "licence": licence or "unknown",
            "inputs": onnx_info.inputs,
            "outputs": onnx_info.outputs,
            "opset": onnx_info.opset,
        }
    return ModelManifest(
        id=model_id,
        version=version,
        format="gguf" if fmt == "gguf" else "onnx",
        file_name=file_name or f"model.{fmt}",
        file_size=digest.size,
        sha256=digest.sha256,
        chunk_size=digest.chunk_size,
        chunk_sha256=digest.chunk_sha256,
        min_cpu_features=min_cpu_features,
        companions=companions,
        **fields,
    )


__all__ = ["QUANT_OPS", "OnnxGraphInfo", "build_manifest", "model_format", "read_onnx_info"]
