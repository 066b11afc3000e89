"""Pure memory estimate of a loaded model: bytes in, bytes out, no I/O.

For a GGUF model served by llama.cpp (through llama-cpp-python, CPU backend)::

    total = weights + kv_cache + compute + output + overhead

* ``weights``  the file's tensor data. The file is mmapped; every tensor is touched by a forward pass
  (Gemma's output projection is the tied 262k-row embedding table), so all of it becomes resident.
* ``kv_cache`` per layer ``cells(layer) x n_head_kv(layer) x (key_length + value_length) x kv_bytes``.
  Global layers hold ``n_ctx`` cells (padded to 256). Sliding-window layers hold
  ``min(n_ctx, pad(window + n_ubatch, 256))`` cells when ``swa_full`` is off; llama-cpp-python's
  default context parameters switch it ON, so they hold ``n_ctx`` cells too. Grouped-query attention
  enters through ``n_head_kv``. The buffer is cleared at creation, so it is resident at load.
* ``compute`` llama.cpp *reserves* a graph buffer for the worst ubatch:
  ``max(n_ubatch x n_vocab x 4, attention)`` -- 514.5 MiB for Gemma 3's 262k vocabulary at ubatch
  512 -- but only the pages a real graph writes become resident. With one output row per sequence
  (llama-cpp-python without ``logits_all``) the logits part stays virtual; what is written grows with
  the context in use: the f32 attention scores and mask ``n_ubatch x n_kv x (n_head + 1) x 4`` plus the
  per-token activations ``n_ubatch x (4 n_embd + 2 n_ff) x 4``. :attr:`MemoryEstimate.compute` is that
  resident part at ``context_used`` (default: the whole context, the worst case);
  :attr:`MemoryEstimate.compute_reserved` is the address space llama.cpp asks for, which matters
  under strict overcommit (``vm.overcommit_memory=2``) or on a GPU, where reservations are real.
* ``output``   ``n_outputs x n_vocab x 4`` (one row per sequence) -- 1 MiB for Gemma 3.
* ``overhead`` the runtime: vocabulary tables, token-piece cache, thread pools, Python objects
  (``RUNTIME_OVERHEAD_BASE`` + ``RUNTIME_OVERHEAD_PER_TOKEN`` x ``n_vocab``; calibrated by
  ``bench/memory_estimate.py``).

For ONNX (encoders): ``initializer_bytes x ONNX_OVERHEAD_FACTOR`` (session creation: graph
optimisations, prepacked and dequantised weights) ``+ batch x max_length^2 x ONNX_ATTENTION_BYTES``
(the arena a full batch of attention leaves behind); both factors are measured.

Invariants: every function is pure and total over valid inputs; all sizes are non-negative ints in
bytes; the estimate is monotonic in ``n_ctx``, ``context_used``, ``n_ubatch`` and file size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from registry.gguf_info import GGUFInfo

MIB = 1 << 20
GIB = 1 << 30
KV_PAD = 256
"""llama.cpp pads the KV cache size (and the number of cells a graph attends to) to 256."""
KV_TYPE_BYTES: dict[str, float] = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
RUNTIME_OVERHEAD_BASE = 32 * MIB
RUNTIME_OVERHEAD_PER_TOKEN = 128
"""Bytes per vocabulary entry held by the tokenizer and its caches (about 32 MiB for 262k tokens)."""
ONNX_OVERHEAD_FACTOR = 9.4
"""onnxruntime CPU session (graph optimisations, prepacked and dequantised copies, arena) per
initializer byte: measured 214 MiB peak for MiniLM-L6 INT8's 21.8 MiB (bench/memory_estimate.py --onnx)."""
ONNX_ATTENTION_BYTES = 304
"""Arena bytes per (batch x sequence^2) element of a forward pass, measured on the same 12-head encoder."""


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the estimate needs to know about a model. Built from a GGUF header or a manifest."""

    file_size: int
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: tuple[int, ...]
    """One entry for all layers, or one per layer."""
    key_length: int
    value_length: int
    n_vocab: int
    n_ff: int = 0
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] = ()
    """Per layer: True when it attends only to the last ``sliding_window`` tokens."""
    format: str = "gguf"
    initializer_bytes: int = 0
    """ONNX only: total size of the graph's initializers."""

    @classmethod
    def onnx(cls, file_size: int, initializer_bytes: int) -> ModelShape:
        """An ONNX encoder's shape: only the file and initializer sizes enter its estimate."""
        return cls(
            file_size=file_size,
            n_layers=0,
            n_embd=0,
            n_head=0,
            n_head_kv=(0,),
            key_length=0,
            value_length=0,
            n_vocab=0,
            format="onnx",
            initializer_bytes=initializer_bytes,
        )

    def kv_heads(self, layer: int) -> int:
        return self.n_head_kv[0] if len(self.n_head_kv) == 1 else self.n_head_kv[layer]

    def is_swa(self, layer: int) -> bool:
        return bool(self.sliding_window) and layer < len(self.swa_layers) and self.swa_layers[layer]


@dataclass(frozen=True, slots=True)
class RuntimeParams:
    """How the model is loaded. Defaults are the engine's: ``n_batch`` 512, f16 KV, full SWA cache."""

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    kv_type: str = "f16"
    swa_full: bool = True
    n_seq: int = 1
    context_used: int | None = None
    """Tokens in the context when the peak is measured; ``None`` means ``n_ctx`` (worst case)."""
    onnx_batch: int = 32
    onnx_max_length: int = 256
    """ONNX encoders: texts per batch and tokens per text (``[embedding]`` settings)."""


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes by component; ``total`` is what the selection compares with the budget."""

    weights: int
    kv_cache: int
    compute: int
    output: int
    overhead: int
    compute_reserved: int = 0
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute + self.output + self.overhead

    @property
    def reserved_total(self) -> int:
        """Address space including llama.cpp's whole compute reservation (strict overcommit, GPUs)."""
        return (
            self.weights
            + self.kv_cache
            + max(self.compute, self.compute_reserved)
            + self.output
            + (self.overhead)
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "kv_cache": self.kv_cache,
            "compute": self.compute,
            "compute_reserved": self.compute_reserved,
            "output": self.output,
            "overhead": self.overhead,
            "total": self.total,
        }


def _pad(n: int, to: int = KV_PAD) -> int:
    return -(-n // to) * to


def kv_cells(shape: ModelShape, layer: int, params: RuntimeParams) -> int:
    """Cells the KV cache holds for ``layer``."""
    full = _pad(params.n_ctx)
    if shape.is_swa(layer) and not params.swa_full and shape.sliding_window:
        return min(full, _pad(shape.sliding_window * params.n_seq + params.n_ubatch))
    return full


def kv_cache_bytes(shape: ModelShape, params: RuntimeParams) -> int:
    """Sum over layers of cells x KV heads x (key + value length) x bytes per value."""
    per_value = KV_TYPE_BYTES[params.kv_type]
    width = shape.key_length + shape.value_length
    full = _pad(params.n_ctx)
    window = full
    if shape.sliding_window and not params.swa_full:
        window = min(full, _pad(shape.sliding_window * params.n_seq + params.n_ubatch))
    swa = shape.swa_layers if shape.sliding_window else ()
    if len(shape.n_head_kv) == 1:
        n_swa = sum(1 for flag in swa[: shape.n_layers] if flag)
        heads = shape.n_head_kv[0]
        total = (n_swa * window + (shape.n_layers - n_swa) * full) * heads * width * per_value
        return int(total)
    acc = 0.0
    for layer in range(shape.n_layers):
        cells = window if layer < len(swa) and swa[layer] else full
        acc += cells * shape.n_head_kv[layer] * width * per_value
    return int(acc)


def compute_bytes(shape: ModelShape, params: RuntimeParams) -> tuple[int, int]:
    """(resident at ``context_used``, reserved by llama.cpp's worst-case graph)."""
    ub = min(params.n_ubatch, params.n_batch)
    used = min(params.context_used or params.n_ctx, params.n_ctx)
    n_kv = min(_pad(used + ub), _pad(params.n_ctx))
    attention = ub * n_kv * (shape.n_head + 1) * 4
    activations = ub * (4 * shape.n_embd + 2 * shape.n_ff) * 4
    resident = attention + activations
    worst_attention = ub * _pad(params.n_ctx) * (shape.n_head + 1) * 4
    reserved = max(ub * shape.n_vocab * 4, worst_attention) + activations
    return resident, reserved


def runtime_overhead(shape: ModelShape) -> int:
    return RUNTIME_OVERHEAD_BASE + RUNTIME_OVERHEAD_PER_TOKEN * shape.n_vocab


def estimate_gguf(shape: ModelShape, params: RuntimeParams) -> MemoryEstimate:
    """Resident memory of a llama.cpp CPU load of ``shape`` with ``params`` (see module docstring)."""
    resident, reserved = compute_bytes(shape, params)
    return MemoryEstimate(
        weights=shape.file_size,
        kv_cache=kv_cache_bytes(shape, params),
        compute=resident,
        output=params.n_seq * shape.n_vocab * 4,
        overhead=runtime_overhead(shape),
        compute_reserved=reserved,
    )


def estimate_onnx(shape: ModelShape, params: RuntimeParams | None = None) -> MemoryEstimate:
    """onnxruntime CPU session: initializers x the measured factor + the attention arena of a batch."""
    p = params or RuntimeParams()
    weights = shape.initializer_bytes or shape.file_size
    session = int(weights * ONNX_OVERHEAD_FACTOR)
    return MemoryEstimate(
        weights=weights,
        kv_cache=0,
        compute=session - weights + p.onnx_batch * p.onnx_max_length**2 * ONNX_ATTENTION_BYTES,
        output=0,
        overhead=0,
    )


def estimate(shape: ModelShape, params: RuntimeParams) -> MemoryEstimate:
    return estimate_onnx(shape, params) if shape.format == "onnx" else estimate_gguf(shape, params)


def shape_from_gguf(info: GGUFInfo) -> ModelShape:
    """The estimate's view of a GGUF header (see :mod:`registry.gguf_info`)."""
    return ModelShape(
        file_size=info.file_size,
        n_layers=info.block_count,
        n_embd=info.embedding_length,
        n_head=info.head_count,
        n_head_kv=info.head_count_kv,
        key_length=info.key_length,
        value_length=info.value_length,
        n_vocab=info.vocab_size,
        n_ff=info.feed_forward_length,
        sliding_window=info.sliding_window,
        swa_layers=info.sliding_window_layers,
    )


def fmt_bytes(n: int) -> str:
    """``1.3 GiB`` / ``512 MiB``: the unit people compare with ``free -h``."""
    if abs(n) >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.0f} MiB"


__all__ = [
    "GIB",
    "ONNX_ATTENTION_BYTES",
    "KV_TYPE_BYTES",
    "MIB",
    "ONNX_OVERHEAD_FACTOR",
    "RUNTIME_OVERHEAD_BASE",
    "RUNTIME_OVERHEAD_PER_TOKEN",
    "MemoryEstimate",
    "ModelShape",
    "RuntimeParams",
    "compute_bytes",
    "estimate",
    "estimate_gguf",
    "estimate_onnx",
    "fmt_bytes",
    "kv_cache_bytes",
    "kv_cells",
    "runtime_overhead",
    "shape_from_gguf",
]
