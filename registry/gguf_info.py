"""Read a GGUF file's header: the one GGUF header reader of the project.

What it gives (:class:`GGUFInfo`): architecture, parameter count, layers, attention heads and
grouped-query KV heads, head dimensions, embedding length, training context length, sliding window
and which layers use it, vocabulary size, file type / quantization, chat template, and the tensor
byte sizes by type.

Invariants:

* Reads are bounded: only the header region is touched (through a read-only ``mmap``, never the
  tensor data), and it must end within :data:`MAX_HEADER_BYTES`; strings, arrays, key and tensor
  counts and tensor ranks are each capped. A file that breaks a bound, is truncated, or is not GGUF
  raises :class:`~registry.exceptions.ManifestError` (reason ``malformed``) naming the file and the
  offending field; a file that cannot be read raises :class:`~registry.exceptions.RegistryError`
  with reason ``missing`` or ``io_error``.
* Arrays are skipped, not materialised: the vocabulary size is the length of ``tokenizer.ggml.tokens``
  (262k entries for Gemma 3), read without building 262k Python strings. This is why the reader
  walks the header itself with the `gguf` package's type tables (``GGUFValueType``,
  ``GGML_QUANT_SIZES``, ``LlamaFileType``, key names) instead of ``gguf.GGUFReader``, which builds a
  numpy view per array element and takes seconds on a small board.
* Pure with respect to the rest of the project: no llama.cpp, no network.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import gguf

from registry.exceptions import ManifestError, Reason, RegistryError

MAX_HEADER_BYTES = 512 << 20
"""The header (metadata + tensor infos) must end before this offset."""
MAX_STRING_BYTES = 16 << 20
MAX_ARRAY_ITEMS = 1 << 24
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 20
MAX_DIMS = 4
SUPPORTED_VERSIONS = (2, 3)
_U64 = struct.Struct("<Q")

_SCALAR_FORMATS: dict[gguf.GGUFValueType, str] = {
    gguf.GGUFValueType.UINT8: "<B",
    gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H",
    gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I",
    gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.FLOAT32: "<f",
    gguf.GGUFValueType.BOOL: "<?",
    gguf.GGUFValueType.UINT64: "<Q",
    gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT64: "<d",
}

# Keys whose arrays are small and worth keeping (per-layer values, the SWA layer pattern).
_KEEP_ARRAY_SUFFIXES = (
    ".attention.head_count",
    ".attention.head_count_kv",
    ".attention.sliding_window_pattern",
    ".feed_forward_length",
)

# Architectures whose SWA layer pattern llama.cpp hard-codes (``hparams.set_swa_pattern(n)``: layer
# ``il`` uses the window when ``il % n < n - 1``) when the file carries no explicit pattern.
SWA_PATTERN_BY_ARCH: Mapping[str, int] = MappingProxyType(
    {"gemma2": 2, "gemma3": 6, "gemma3n": 5, "cohere2": 4, "gpt-oss": 2}
)

ScalarValue = int | float | bool | str
Value = ScalarValue | tuple[ScalarValue, ...]


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """A metadata array that was skipped: its element type and length."""

    item_type: str
    length: int


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: str
    n_elements: int
    n_bytes: int


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """The facts about a GGUF model that placement and selection need.

    ``sliding_window_layers[i]`` is True when layer ``i`` attends only to the last
    ``sliding_window`` tokens (its KV cache does not grow with the context).
    ``bits_per_weight`` is tensor bytes x 8 / parameters: the precision measure used for ranking.
    """

    version: int
    architecture: str
    name: str | None
    size_label: str | None
    parameter_count: int
    block_count: int
    head_count: int
    head_count_kv: tuple[int, ...]
    embedding_length: int
    feed_forward_length: int
    key_length: int
    value_length: int
    context_length: int
    sliding_window: int | None
    sliding_window_layers: tuple[bool, ...]
    vocab_size: int
    file_type: int | None
    quantization: str
    chat_template: str | None
    file_size: int
    tensor_bytes: int
    tensor_count: int
    bytes_by_type: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    metadata: Mapping[str, Value | ArrayInfo] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def bits_per_weight(self) -> float:
        return self.tensor_bytes * 8 / self.parameter_count if self.parameter_count else 0.0

    def kv_heads(self, layer: int) -> int:
        if len(self.head_count_kv) == 1:
            return self.head_count_kv[0]
        return self.head_count_kv[layer]


class _Walker:
    """Bounded little-endian reads from the header region of a mapped file."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.path = path
        self.limit = min(len(buf), MAX_HEADER_BYTES)

    def fail(self, what: str) -> ManifestError:
        return ManifestError(f"{self.path}: not a valid GGUF file: {what} (at byte {self.pos})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.limit:
            if self.pos + n > MAX_HEADER_BYTES:
                raise self.fail(f"{what} ends beyond the {MAX_HEADER_BYTES >> 20} MiB header bound")
            raise self.fail(f"truncated while reading {what}")

    def unpack(self, fmt: str, what: str) -> int | float | bool:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value  # type: ignore[no-any-return]

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", what))

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if n > MAX_STRING_BYTES:
            raise self.fail(f"{what} is {n} bytes, more than {MAX_STRING_BYTES}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Step over ``count`` length-prefixed strings (a vocabulary has 262k entries) in one tight
        loop: the bounds of :meth:`string`, but no message is built unless a bound is broken."""
        buf, pos, limit = self.buf, self.pos, self.limit
        unpack = _U64.unpack_from
        for _ in range(count):
            if pos + 8 > limit:
                self.pos = pos
                self.need(8, f"length of {what}")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > MAX_STRING_BYTES or pos + n > limit:
                self.pos = pos
                if n > MAX_STRING_BYTES:
                    raise self.fail(f"{what} is {n} bytes, more than {MAX_STRING_BYTES}")
                self.need(n, what)
            pos += n
        self.pos = pos

    def value_type(self, what: str) -> gguf.GGUFValueType:
        raw = self.u32(f"type of {what}")
        try:
            return gguf.GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {raw}") from None

    def scalar(self, vtype: gguf.GGUFValueType, what: str) -> ScalarValue:
        if vtype is gguf.GGUFValueType.STRING:
            return self.string(what)
        return self.unpack(_SCALAR_FORMATS[vtype], what)

    def value(self, key: str) -> Value | ArrayInfo:
        vtype = self.value_type(key)
        if vtype is not gguf.GGUFValueType.ARRAY:
            return self.scalar(vtype, key)
        itype = self.value_type(f"items of {key}")
        if itype is gguf.GGUFValueType.ARRAY:
            raise self.fail(f"{key} is a nested array")
        count = self.u64(f"length of {key}")
        if count > MAX_ARRAY_ITEMS:
            raise self.fail(f"{key} has {count} items, more than {MAX_ARRAY_ITEMS}")
        if key.endswith(_KEEP_ARRAY_SUFFIXES) and count <= 4096:
            return tuple(self.scalar(itype, key) for _ in range(count))
        if itype is gguf.GGUFValueType.STRING:
            self.skip_strings(count, key)
        else:
            size = struct.calcsize(_SCALAR_FORMATS[itype]) * count
            self.need(size, key)
            self.pos += size
        return ArrayInfo(itype.name, count)


def _tensor_bytes(ggml_type: gguf.GGMLQuantizationType, n_elements: int, shape: tuple[int, ...]) -> int:
    block, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    if shape and shape[0] % block:
        raise ValueError(f"row of {shape[0]} is not a multiple of the {ggml_type.name} block {block}")
    return n_elements // block * type_size


def _swa_layers(arch: str, n_layer: int, window: int | None, pattern: object) -> tuple[bool, ...]:
    if not window:
        return (False,) * n_layer
    if isinstance(pattern, tuple) and len(pattern) == n_layer:
        return tuple(bool(x) for x in pattern)
    explicit = isinstance(pattern, int) and not isinstance(pattern, bool)
    n = pattern if explicit and isinstance(pattern, int) else SWA_PATTERN_BY_ARCH.get(arch)
    if n is None:
        # A window with no known pattern: llama.cpp's default applies it to every layer.
        return (True,) * n_layer
    return tuple(n == 0 or (il % n < n - 1) for il in range(n_layer))


def _quant_name(file_type: int | None, bytes_by_type: Mapping[str, int]) -> str:
    if file_type is not None:
        try:
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            pass
    if not bytes_by_type:
        return "unknown"
    return max(bytes_by_type.items(), key=lambda kv: (kv[1], kv[0]))[0]


def _int(meta: Mapping[str, Value | ArrayInfo], key: str, default: int | None = None) -> int | None:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
            return max(int(v) for v in value)
        return default
    return int(value)


def parse_header(buf: mmap.mmap | bytes, path: Path, file_size: int) -> GGUFInfo:
    """Parse a GGUF header from a buffer (the mapped file). Raises :class:`ManifestError`."""
    w = _Walker(buf, path)
    w.need(4, "magic")
    if bytes(buf[:4]) != b"GGUF":
        raise w.fail("wrong magic (expected 'GGUF')")
    w.pos = 4
    version = w.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise w.fail(f"unsupported GGUF version {version}")
    n_tensors = w.u64("tensor count")
    n_kv = w.u64("metadata count")
    if n_tensors > MAX_TENSOR_COUNT:
        raise w.fail(f"{n_tensors} tensors, more than {MAX_TENSOR_COUNT}")
    if n_kv > MAX_KV_COUNT:
        raise w.fail(f"{n_kv} metadata keys, more than {MAX_KV_COUNT}")
    meta: dict[str, Value | ArrayInfo] = {}
    for _ in range(n_kv):
        name = w.string("metadata key")
        meta[name] = w.value(name)

    tensors: list[TensorInfo] = []
    for _ in range(n_tensors):
        name = w.string("tensor name")
        n_dims = w.u32(f"rank of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise w.fail(f"tensor {name} has rank {n_dims}")
        shape = tuple(w.u64(f"shape of {name}") for _ in range(n_dims))
        raw_type = w.u32(f"type of {name}")
        w.u64(f"offset of {name}")
        try:
            gtype = gguf.GGMLQuantizationType(raw_type)
        except ValueError:
            raise w.fail(f"tensor {name} has unknown type {raw_type}") from None
        n_el = math.prod(shape)
        try:
            n_bytes = _tensor_bytes(gtype, n_el, shape)
        except (ValueError, KeyError) as exc:
            raise w.fail(f"tensor {name}: {exc}") from None
        tensors.append(TensorInfo(name, shape, gtype.name, n_el, n_bytes))

    arch_value = meta.get(gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch_value, str) or not arch_value:
        raise w.fail(f"missing {gguf.Keys.General.ARCHITECTURE}")
    arch = arch_value

    def key(pattern: str) -> str:
        return pattern.format(arch=arch)

    n_layer = _int(meta, key(gguf.Keys.LLM.BLOCK_COUNT), 0) or 0
    n_embd = _int(meta, key(gguf.Keys.LLM.EMBEDDING_LENGTH), 0) or 0
    n_head = _int(meta, key(gguf.Keys.Attention.HEAD_COUNT), 0) or 0
    raw_kv = meta.get(key(gguf.Keys.Attention.HEAD_COUNT_KV))
    if isinstance(raw_kv, tuple) and len(raw_kv) == n_layer and n_layer:
        head_count_kv = tuple(int(v) for v in raw_kv)
    else:
        head_count_kv = (_int(meta, key(gguf.Keys.Attention.HEAD_COUNT_KV), n_head) or 0,)
    head_dim = n_embd // n_head if n_head else 0
    key_length = _int(meta, key(gguf.Keys.Attention.KEY_LENGTH), head_dim) or 0
    value_length = _int(meta, key(gguf.Keys.Attention.VALUE_LENGTH), head_dim) or 0
    window = _int(meta, key(gguf.Keys.Attention.SLIDING_WINDOW))
    pattern = meta.get(key(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN))
    tokens = meta.get(gguf.Keys.Tokenizer.LIST)
    vocab = _int(meta, key(gguf.Keys.LLM.VOCAB_SIZE))
    if vocab is None:
        vocab = tokens.length if isinstance(tokens, ArrayInfo) else 0
    file_type = _int(meta, gguf.Keys.General.FILE_TYPE)
    bytes_by_type: dict[str, int] = {}
    for t in tensors:
        bytes_by_type[t.ggml_type] = bytes_by_type.get(t.ggml_type, 0) + t.n_bytes
    template = meta.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    model_name = meta.get(gguf.Keys.General.NAME)
    size_label = meta.get(gguf.Keys.General.SIZE_LABEL)
    return GGUFInfo(
        version=version,
        architecture=arch,
        name=model_name if isinstance(model_name, str) else None,
        size_label=size_label if isinstance(size_label, str) else None,
        parameter_count=sum(t.n_elements for t in tensors),
        block_count=n_layer,
        head_count=n_head,
        head_count_kv=head_count_kv,
        embedding_length=n_embd,
        feed_forward_length=_int(meta, key(gguf.Keys.LLM.FEED_FORWARD_LENGTH), 0) or 0,
        key_length=key_length,
        value_length=value_length,
        context_length=_int(meta, key(gguf.Keys.LLM.CONTEXT_LENGTH), 0) or 0,
        sliding_window=window or None,
        sliding_window_layers=_swa_layers(arch, n_layer, window, pattern),
        vocab_size=vocab,
        file_type=file_type,
        quantization=_quant_name(file_type, bytes_by_type),
        chat_template=template if isinstance(template, str) else None,
        file_size=file_size,
        tensor_bytes=sum(t.n_bytes for t in tensors),
        tensor_count=len(tensors),
        bytes_by_type=MappingProxyType(bytes_by_type),
        metadata=MappingProxyType(meta),
    )


def read_gguf_info(path: Path | str) -> GGUFInfo:
    """Read the header of the GGUF file at ``path``; raise :class:`ManifestError` if it is not one."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            size = fh.seek(0, 2)
            if size < 24:
                raise ManifestError(f"{p}: not a valid GGUF file: only {size} bytes")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return parse_header(buf, p, size)
    except FileNotFoundError:
        raise RegistryError(f"{p}: no such file", reason=Reason.MISSING) from None
    except OSError as exc:
        raise RegistryError(f"{p}: cannot read: {exc.strerror or exc}", reason=Reason.IO_ERROR) from None


__all__ = [
    "MAX_HEADER_BYTES",
    "SWA_PATTERN_BY_ARCH",
    "ArrayInfo",
    "GGUFInfo",
    "TensorInfo",
    "parse_header",
    "read_gguf_info",
]
