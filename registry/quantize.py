"""Quantized variants: GGUF through llama.cpp's quantizer, ONNX through onnxruntime's dynamic INT8.

Invariants: the output appears under its final name only when the quantizer succeeded (it writes a
temp file in the same directory, renamed afterwards); requantizing an already quantized GGUF (or
re-quantizing an INT8 ONNX graph) is refused unless ``allow_requantize`` is given, because every
extra quantization step loses precision. Heavy imports happen inside the functions.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from registry.exceptions import ManifestError, Reason, RegistryError
from registry.files import temp_name

GGUF_TARGETS: dict[str, str] = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}
"""Names accepted by ``--to`` for GGUF sources, mapped to llama.cpp's file types."""
ONNX_TARGETS = ("int8",)
_UNQUANTIZED = frozenset({"F32", "F16", "BF16", "ALL_F32", "MOSTLY_F16", "MOSTLY_BF16"})


@dataclass(frozen=True, slots=True)
class Variant:
    target: str
    path: Path
    size: int
    seconds: float
    source_size: int

    @property
    def reduction(self) -> float:
        """Fraction of the source size saved (negative when the variant is larger)."""
        return 1.0 - self.size / self.source_size if self.source_size else 0.0


def parse_targets(text: str, fmt: str) -> tuple[str, ...]:
    """``"q4_0,q8_0"`` -> ``("q4_0", "q8_0")``; refuse unknown names for the format."""
    names = tuple(dict.fromkeys(t.strip().lower() for t in text.split(",") if t.strip()))
    allowed = tuple(GGUF_TARGETS) if fmt == "gguf" else ONNX_TARGETS
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise ManifestError(
            f"unknown quantization {', '.join(unknown) or '(none)'} for {fmt}; "
            f"choose from {', '.join(allowed)}"
        )
    return names


def quantize_gguf(
    source: Path, dest: Path, target: str, *, allow_requantize: bool = False, threads: int = 2
) -> Variant:
    """Write ``source`` quantized to ``target`` (a :data:`GGUF_TARGETS` name) at ``dest``."""
    from registry.gguf_info import read_gguf_info

    info = read_gguf_info(source)
    if info.quantization.upper() not in _UNQUANTIZED and not allow_requantize:
        raise ManifestError(
            f"{source} is already quantized ({info.quantization}); requantizing loses precision: "
            "pass --allow-requantize to do it anyway",
            reason=Reason.MALFORMED,
        )
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_TARGETS[target])
    params.allow_requantize = allow_requantize
    params.nthread = threads
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest.parent, target)
    started = time.perf_counter()
    try:
        rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise RegistryError(f"llama.cpp could not quantize {source} to {target} (status {rc})")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return Variant(target, dest, dest.stat().st_size, seconds, source.stat().st_size)


def quantize_onnx_int8(source: Path, dest: Path, *, allow_requantize: bool = False) -> Variant:
    """Dynamic INT8 quantization of an ONNX graph's weights (onnxruntime)."""
    if _onnx_is_quantized(source) and not allow_requantize:
        raise ManifestError(
            f"{source} is already quantized (integer weights); pass --allow-requantize to do it anyway"
        )
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(dest.parent, "int8").with_suffix(".onnx")
    started = time.perf_counter()
    try:
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8)
        os.replace(tmp, dest)
    except (OSError, ValueError, RuntimeError) as exc:
        raise RegistryError(f"onnxruntime could not quantize {source}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    return Variant("int8", dest, dest.stat().st_size, seconds, source.stat().st_size)


def _onnx_is_quantized(path: Path) -> bool:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ManifestError(f"{path}: not a valid ONNX model: {exc}") from None
    quant_ops = {"DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul", "QuantizeLinear", "MatMulNBits"}
    if any(n.op_type in quant_ops for n in model.graph.node):
        return True
    return any(i.data_type in (2, 3) and len(i.dims) >= 2 for i in model.graph.initializer)


__all__ = ["GGUF_TARGETS", "ONNX_TARGETS", "Variant", "parse_targets", "quantize_gguf", "quantize_onnx_int8"]
