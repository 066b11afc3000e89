"""Pure memory estimate of a loaded model: bytes in, bytes out, no I/O.

For a GGUF model served by llama.cpp (through llama-cpp-python, CPU backend)::

    total = weights + kv_cache + compute + output + overhead

* ``weights``  the file's tensor data. The file is mmapped; every tensor is touched by a forward pass
  (Gemma's output projection is the tied 262k-row embedding table), so all of it becomes resident.
  With repacked kernels (``RuntimeParams.repack``, the engine's ``batch_invariant = false``) a
  tensor moved to llama.cpp's CPU_REPACK buffer is held twice: the mapped file pages its copy read
  stay mapped, and the repacked copy is anonymous memory. Which types are repacked depends on the
  CPU (:func:`repack_types`: Q4_0/Q4_K/IQ4_NL/MXFP4 with AVX2, plus Q2_K with AVX-512; the K-quants,
  Q8_0 and more on ARM with dotprod or i8mm); on an unknown CPU, or for a model whose tensor types
  are unknown (a manifest), every type that some CPU repacks (:data:`REPACKABLE_TYPES`) counts.
* ``kv_cache`` ``streams x`` per layer ``cells(layer) x n_head_kv(layer) x (row(key_length, type_k)
  + row(value_length, type_v))``, a row being whole blocks of its type (f16/bf16: 2 bytes a value;
  ``q8_0``: 34 bytes per 32 values; ``q4_0``: 18 per 32 -- the f16 scale of each block included).
  It mirrors llama.cpp's allocation, which is **resident at creation on every CPU**: the KV buffer
  is cleared with ``memset`` when the context is created, which touches every page
  (measured: the whole cache is resident before the first token; no transparent huge pages).

  - unified cache (``kv_unified``, or one sequence): one stream of ``pad256(n_ctx)`` cells that
    all ``n_seq`` sequences share; sliding-window layers without ``swa_full`` hold
    ``min(n_ctx, pad256(window x n_seq + n_ubatch))`` cells;
  - a stream per sequence (``kv_unified = false``, the engine's default): the engine asks
    llama.cpp for ``n_ctx x n_seq`` cells, which it splits into ``n_seq`` streams of
    ``n_ctx_seq = pad256(pad256(n_ctx x n_seq) / n_seq)`` (= ``pad256(n_ctx)``) cells each;
    sliding-window layers without ``swa_full`` hold ``min(n_ctx_seq, pad256(window + n_ubatch))``
    per stream. So the KV cache is ``n_seq`` times that of one sequence.

  ``swa_full`` (the engine's setting) makes sliding-window layers full-size. Grouped-query
  attention enters through ``n_head_kv``.
* ``compute`` llama.cpp *reserves* a graph buffer for the worst ubatch:
  ``max(n_ubatch x n_vocab x 4, attention)`` -- 514.5 MiB for Gemma 3's 262k vocabulary at ubatch
  512 -- but only the pages a real graph writes become resident. With one output row per sequence
  the logits part stays virtual; what is written grows with the context in use: the f32 attention
  scores and mask ``n_ubatch x n_kv x (n_head + 1) x 4`` (the engine's batch-invariant contexts
  compute attention without flash attention, so the scores exist) plus the per-token activations
  ``n_ubatch x (4 n_embd + 2 n_ff) x 4``. ``n_kv`` is the cells of one stream in use.
  :attr:`MemoryEstimate.compute` is that resident part at ``context_used`` (default: the whole
  context, the worst case); :attr:`MemoryEstimate.compute_reserved` is the address space llama.cpp
  asks for, which matters under strict overcommit (``vm.overcommit_memory=2``) or on a GPU, where
  reservations are real.
* ``output``   ``n_seq x n_vocab x 4`` (one logits row per sequence) -- 1 MiB each for Gemma 3.
* ``overhead`` the runtime: vocabulary tables, token-piece cache, thread pools, Python objects
  (``RUNTIME_OVERHEAD_BASE`` + ``RUNTIME_OVERHEAD_PER_TOKEN`` x ``n_vocab``; calibrated by
  ``bench/memory_estimate.py``).

For ONNX (encoders): ``initializer_bytes x ONNX_OVERHEAD_FACTOR`` (session creation: graph
optimisations, prepacked and dequantised weights) ``+ batch x max_length^2 x ONNX_ATTENTION_BYTES``
(the arena a full batch of attention leaves behind); both factors are measured.

Invariants: every function is pure and total over valid inputs; all sizes are non-negative ints in
bytes; the estimate is monotonic in ``n_ctx``, ``n_seq``, ``context_used``, ``n_ubatch`` and file
size; a per-sequence KV cache (``kv_unified = false``) is never smaller than a unified one, and
repacked kernels never estimate less than plain ones. Allocations whose residency could depend on
the CPU are counted as resident (an under-estimate is how a box gets OOM-killed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from registry.gguf_info import GGUFInfo

MIB = 1 << 20
GIB = 1 << 30
KV_PAD = 256
"""llama.cpp pads the KV cache size (and the number of cells a graph attends to) to 256."""
KV_TYPE_BLOCKS: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
}
"""KV cache element types: (values per block, bytes per block). ``q8_0`` is 32 int8 values and an
f16 scale, ``q4_0`` 32 nibbles and an f16 scale (ggml's ``block_q8_0`` / ``block_q4_0``)."""
KV_TYPE_BYTES: dict[str, float] = {t: size / n for t, (n, size) in KV_TYPE_BLOCKS.items()}
"""Bytes per value, block overhead included (q8_0: 1.0625, q4_0: 0.5625)."""
RUNTIME_OVERHEAD_BASE = 32 * MIB
RUNTIME_OVERHEAD_PER_TOKEN = 128
"""Bytes per vocabulary entry held by the tokenizer and its caches (about 32 MiB for 262k tokens)."""
ONNX_OVERHEAD_FACTOR = 9.4
"""onnxruntime CPU session (graph optimisations, prepacked and dequantised copies, arena) per
initializer byte: measured 214 MiB peak for MiniLM-L6 INT8's 21.8 MiB (bench/memory_estimate.py --onnx)."""
ONNX_ATTENTION_BYTES = 304
"""Arena bytes per (batch x sequence^2) element of a forward pass, measured on the same 12-head encoder."""
REPACKABLE_TYPES = frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q8_0", "IQ4_NL", "MXFP4", "Q1_0"})
"""Tensor types some llama.cpp CPU repack kernel (``ggml-cpu/repack.cpp``, any CPU) may take."""
_REPACK_X86_AVX2 = frozenset({"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"})
_REPACK_ARM_DOTPROD = frozenset({"Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "IQ4_NL", "MXFP4", "Q1_0"})


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
    bytes_by_type: tuple[tuple[str, int], ...] = ()
    """Tensor bytes per ggml type name (``("Q4_K", n)``); empty when unknown (a manifest)."""

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
    """How the model is loaded: ``n_batch`` 512, f16 KV, full SWA cache, plain kernels, a KV stream
    per sequence are the engine's defaults. ``n_seq`` defaults to one sequence; the engine runs
    ``engine.n_parallel`` (4) -- :func:`agent.daemon.candidates.policy_from_settings` passes it."""

    n_ctx: int = 4096
    """Cells one sequence may use (``engine.n_ctx``); with ``kv_unified`` the cells all share."""
    n_batch: int = 512
    n_ubatch: int = 512
    kv_type_k: str = "f16"
    """Element type of the cached keys (``engine.kv_cache_type_k``; a :data:`KV_TYPE_BLOCKS` name)."""
    kv_type_v: str = "f16"
    """Element type of the cached values (``engine.kv_cache_type_v``)."""
    swa_full: bool = True
    n_seq: int = 1
    """Sequence slots of the context (``engine.n_parallel``)."""
    kv_unified: bool = False
    """True: the ``n_seq`` slots share ``n_ctx`` cells; False: each has a stream of ``n_ctx`` cells."""
    repack: bool = False
    """llama.cpp's repacked CPU kernels (``engine.batch_invariant = false``)."""
    repack_types: frozenset[str] = REPACKABLE_TYPES
    """Types this CPU repacks (:func:`repack_types`); the default is every type any CPU repacks."""
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


def kv_streams(params: RuntimeParams) -> int:
    """KV streams llama.cpp allocates: one when unified (or one sequence), else one per sequence."""
    return 1 if params.kv_unified else max(1, params.n_seq)


def kv_stream_cells(params: RuntimeParams) -> int:
    """Cells of one stream for a full-attention layer (llama.cpp's ``n_ctx_seq``).

    The engine creates a unified context with ``n_ctx`` cells and a per-sequence one with
    ``n_ctx x n_seq``; llama.cpp pads the total to 256 and, per sequence, pads the share again.
    """
    if kv_streams(params) == 1:
        return _pad(params.n_ctx)
    streams = kv_streams(params)
    return _pad(_pad(params.n_ctx * streams) // streams)


def _swa_cells(shape: ModelShape, params: RuntimeParams, full: int) -> int:
    if not shape.sliding_window or params.swa_full:
        return full
    seqs_in_stream = max(1, params.n_seq) if kv_streams(params) == 1 else 1
    return min(full, _pad(shape.sliding_window * seqs_in_stream + params.n_ubatch))


def kv_cells(shape: ModelShape, layer: int, params: RuntimeParams) -> int:
    """Cells one KV stream holds for ``layer`` (see :func:`kv_streams` for how many streams)."""
    full = kv_stream_cells(params)
    if shape.is_swa(layer):
        return _swa_cells(shape, params, full)
    return full


def kv_row_bytes(kv_type: str, n_values: int) -> int:
    """Bytes of one cell's row of ``n_values`` keys (or values) of one KV head in ``kv_type``:
    whole blocks, so a row that does not fill its last block pays for all of it."""
    per_block, size = KV_TYPE_BLOCKS[kv_type]
    return -(-n_values // per_block) * size


def kv_cell_bytes(shape: ModelShape, params: RuntimeParams, heads: int) -> int:
    """Bytes one cell of one layer with ``heads`` KV heads takes: keys and values, each in its type."""
    return heads * (
        kv_row_bytes(params.kv_type_k, shape.key_length) + kv_row_bytes(params.kv_type_v, shape.value_length)
    )


def kv_cache_bytes(shape: ModelShape, params: RuntimeParams) -> int:
    """Streams x sum over layers of cells x bytes per cell (:func:`kv_cell_bytes`: KV heads x the
    key and value rows in their own types, block overhead included)."""
    full = kv_stream_cells(params)
    window = _swa_cells(shape, params, full)
    streams = kv_streams(params)
    swa = shape.swa_layers if shape.sliding_window else ()
    if len(shape.n_head_kv) == 1:
        n_swa = sum(1 for flag in swa[: shape.n_layers] if flag)
        cell = kv_cell_bytes(shape, params, shape.n_head_kv[0])
        return (n_swa * window + (shape.n_layers - n_swa) * full) * cell * streams
    acc = 0
    for layer in range(shape.n_layers):
        cells = window if layer < len(swa) and swa[layer] else full
        acc += cells * kv_cell_bytes(shape, params, shape.n_head_kv[layer])
    return acc * streams


def compute_bytes(shape: ModelShape, params: RuntimeParams) -> tuple[int, int]:
    """(resident at ``context_used``, reserved by llama.cpp's worst-case graph).

    ``n_kv`` counts the cells of one stream: the largest ubatch is a prompt chunk, which belongs to
    one sequence; a generation batch has one query row per stream, far fewer than ``n_ubatch``.
    """
    ub = min(params.n_ubatch, params.n_batch)
    cells = kv_stream_cells(params)
    used = min(params.context_used or cells, cells)
    n_kv = min(_pad(used + ub), cells)
    attention = ub * n_kv * (shape.n_head + 1) * 4
    activations = ub * (4 * shape.n_embd + 2 * shape.n_ff) * 4
    resident = attention + activations
    worst_attention = ub * cells * (shape.n_head + 1) * 4
    reserved = max(ub * shape.n_vocab * 4, worst_attention) + activations
    return resident, reserved


def runtime_overhead(shape: ModelShape) -> int:
    return RUNTIME_OVERHEAD_BASE + RUNTIME_OVERHEAD_PER_TOKEN * shape.n_vocab


def repack_types(arch: str, features: frozenset[str]) -> frozenset[str]:
    """Tensor types llama.cpp's CPU repack takes on a CPU (``ggml_repack_get_optimal_repack_type``
    of the llama.cpp in llama-cpp-python 0.3.36); :data:`REPACKABLE_TYPES` when unknown."""
    if arch == "x86_64" and features:
        if "avx2" not in features:
            return frozenset()
        return _REPACK_X86_AVX2 | ({"Q2_K"} if "avx512f" in features else set())
    if arch == "aarch64" and features:
        if "dotprod" in features or "i8mm" in features:
            return _REPACK_ARM_DOTPROD
        return frozenset()
    return REPACKABLE_TYPES


def weights_bytes(shape: ModelShape, params: RuntimeParams) -> int:
    """The mapped file, plus a second copy of every repacked tensor when kernels are repacked."""
    if not params.repack:
        return shape.file_size
    if not shape.bytes_by_type:
        return 2 * shape.file_size
    extra = sum(n for t, n in shape.bytes_by_type if t in params.repack_types)
    return shape.file_size + min(extra, shape.file_size)


def estimate_gguf(shape: ModelShape, params: RuntimeParams) -> MemoryEstimate:
    """Resident memory of a llama.cpp CPU load of ``shape`` with ``params`` (see module docstring)."""
    resident, reserved = compute_bytes(shape, params)
    return MemoryEstimate(
        weights=weights_bytes(shape, params),
        kv_cache=kv_cache_bytes(shape, params),
        compute=resident,
        output=max(1, params.n_seq) * shape.n_vocab * 4,
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
        bytes_by_type=tuple(sorted(info.bytes_by_type.items())),
    )


def fmt_bytes(n: int) -> str:
    """``1.3 GiB`` / ``512 MiB``: the unit people compare with ``free -h``."""
    if abs(n) >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.0f} MiB"


__all__ = [
    "GIB",
    "ONNX_ATTENTION_BYTES",
    "KV_TYPE_BLOCKS",
    "KV_TYPE_BYTES",
    "MIB",
    "ONNX_OVERHEAD_FACTOR",
    "REPACKABLE_TYPES",
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
    "kv_cell_bytes",
    "kv_cells",
    "kv_row_bytes",
    "kv_stream_cells",
    "kv_streams",
    "repack_types",
    "runtime_overhead",
    "shape_from_gguf",
    "weights_bytes",
]
