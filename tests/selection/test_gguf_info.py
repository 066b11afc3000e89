"""registry.gguf_info against the real Gemma 3 270M header, gguf-written files and malformed bytes."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from registry.exceptions import ManifestError, Reason, RegistryError
from registry.gguf_info import MAX_HEADER_BYTES, read_gguf_info


def test_real_gemma_header(gemma_path: Path) -> None:
    info = read_gguf_info(gemma_path)
    assert info.architecture == "gemma3"
    assert info.block_count == 18
    assert info.head_count == 4
    assert info.head_count_kv == (1,)
    assert info.embedding_length == 640
    assert (info.key_length, info.value_length) == (256, 256)
    assert info.context_length == 32768
    assert info.vocab_size == 262144
    assert info.quantization == "Q4_K_M"
    assert info.sliding_window == 512
    # Gemma 3: every sixth layer is global, the rest use the 512-token window.
    assert info.sliding_window_layers == tuple(i % 6 != 5 for i in range(18))
    assert 260_000_000 < info.parameter_count < 280_000_000
    assert info.tensor_bytes < info.file_size
    assert 4.0 < info.bits_per_weight < 9.0
    assert sum(info.bytes_by_type.values()) == info.tensor_bytes


def _write(path: Path, arch: str = "llama", extra: dict[str, object] | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(4)
    w.add_embedding_length(64)
    w.add_head_count(8)
    w.add_context_length(2048)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_token_list([f"t{i}".encode() for i in range(300)])
    for key, value in (extra or {}).items():
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, str(value))
    w.add_tensor("token_embd.weight", np.zeros((300, 64), dtype=np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((64, 64), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_written_file_defaults(tmp_path: Path) -> None:
    info = read_gguf_info(_write(tmp_path / "m.gguf"))
    assert info.architecture == "llama"
    assert info.parameter_count == 300 * 64 + 64 * 64
    assert info.tensor_bytes == 300 * 64 * 4 + 64 * 64 * 2
    assert info.head_count_kv == (8,)  # no GQA key: as many KV heads as heads
    assert info.key_length == 8  # embedding / heads
    assert info.vocab_size == 300
    assert info.quantization == "ALL_F32"
    assert info.sliding_window is None
    assert info.sliding_window_layers == (False,) * 4
    assert info.chat_template is None


@pytest.mark.parametrize(
    ("arch", "extra", "expected"),
    [
        ("gemma2", {"gemma2.attention.sliding_window": 4096}, (True, False, True, False)),
        ("llama", {"llama.attention.sliding_window": 128}, (True,) * 4),
        (
            "llama",
            {"llama.attention.sliding_window": 128, "llama.attention.sliding_window_pattern": 2},
            (True, False, True, False),
        ),
        (
            "llama",
            {
                "llama.attention.sliding_window": 128,
                "llama.attention.sliding_window_pattern": [False, True, True, False],
            },
            (False, True, True, False),
        ),
    ],
    ids=["gemma2-arch-default", "window-without-pattern", "int-pattern", "bool-array-pattern"],
)
def test_sliding_window_layers(
    tmp_path: Path, arch: str, extra: dict[str, object], expected: tuple[bool, ...]
) -> None:
    info = read_gguf_info(_write(tmp_path / "m.gguf", arch, extra))
    assert info.sliding_window_layers == expected


def test_per_layer_kv_heads_and_template(tmp_path: Path) -> None:
    extra: dict[str, object] = {
        "llama.attention.head_count_kv": [1, 2, 4, 8],
        "tokenizer.chat_template": "{{ messages }}",
    }
    info = read_gguf_info(_write(tmp_path / "m.gguf", "llama", extra))
    assert info.head_count_kv == (1, 2, 4, 8)
    assert [info.kv_heads(i) for i in range(4)] == [1, 2, 4, 8]
    assert info.chat_template == "{{ messages }}"


def _s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def _kv_string(key: str, value: str) -> bytes:
    return _s(key) + struct.pack("<I", gguf.GGUFValueType.STRING) + _s(value)


ARCH = _kv_string("general.architecture", "llama")
STR = struct.pack("<I", gguf.GGUFValueType.STRING)
ARR = struct.pack("<I", gguf.GGUFValueType.ARRAY)


def _header(n_tensors: int, n_kv: int, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _tensor(name: str, dims: tuple[int, ...], ggml_type: int = 0) -> bytes:
    body = _s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
    return body + struct.pack("<IQ", ggml_type, 0)


MALFORMED = [
    ("wrong-magic", b"GGML" + b"\0" * 40, "wrong magic"),
    ("version-1", _header(0, 0, version=1) + b"\0" * 8, "unsupported GGUF version 1"),
    ("truncated-metadata", _header(0, 1), "truncated"),
    ("too-many-tensors", _header(1 << 40, 0), "tensors, more than"),
    ("too-many-keys", _header(0, 1 << 40), "metadata keys, more than"),
    ("truncated-key", _header(0, 1) + struct.pack("<Q", 1000) + b"abc", "truncated"),
    ("huge-string", _header(0, 1) + struct.pack("<Q", 1 << 40), "more than"),
    ("unknown-type", _header(0, 1) + _s("k") + struct.pack("<I", 99), "unknown value type 99"),
    ("nested-array", _header(0, 1) + _s("k") + ARR + ARR, "nested array"),
    ("huge-array", _header(0, 1) + _s("k") + ARR + STR + struct.pack("<Q", 1 << 40), "items, more than"),
    (
        "array-past-end",
        _header(0, 1) + _s("k") + ARR + struct.pack("<IQ", gguf.GGUFValueType.UINT64, 1 << 20),
        "truncated",
    ),
    (
        "string-array-item-past-end",
        _header(0, 1) + _s("k") + ARR + STR + struct.pack("<QQ", 3, 1000) + b"abc",
        "truncated while reading k",
    ),
    (
        "huge-string-in-array",
        _header(0, 1) + _s("k") + ARR + STR + struct.pack("<QQ", 2, 1 << 40),
        "k is 1099511627776 bytes, more than",
    ),
    (
        "string-array-lengths-past-end",
        _header(0, 1) + _s("k") + ARR + STR + struct.pack("<Q", 100) + _s("a"),
        "truncated while reading length of k",
    ),
    ("not-utf8", _header(0, 1) + struct.pack("<Q", 2) + b"\xff\xfe", "not UTF-8"),
    ("missing-architecture", _header(0, 0) + b"\0" * 16, "missing general.architecture"),
    ("rank-zero", _header(1, 1) + ARCH + _tensor("t", ()), "rank 0"),
    ("rank-five", _header(1, 1) + ARCH + _tensor("t", (1, 1, 1, 1, 1)), "rank 5"),
    ("unknown-tensor-type", _header(1, 1) + ARCH + _tensor("t", (32,), 250), "unknown type 250"),
    ("row-not-block-multiple", _header(1, 1) + ARCH + _tensor("t", (33,), 2), "not a multiple"),
]


@pytest.mark.parametrize(("data", "message"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_headers_are_refused(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(ManifestError) as err:
        read_gguf_info(path)
    assert message in str(err.value)
    assert err.value.reason is Reason.MALFORMED
    assert str(path) in str(err.value)


def test_header_bound_is_enforced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A header that would run past the bound is refused, even though the file is long enough.
    import registry.gguf_info as mod

    path = _write(tmp_path / "m.gguf")
    assert read_gguf_info(path).architecture == "llama"
    monkeypatch.setattr(mod, "MAX_HEADER_BYTES", 256)
    with pytest.raises(ManifestError, match="header bound"):
        read_gguf_info(path)
    assert path.stat().st_size > 256
    assert MAX_HEADER_BYTES >= 64 << 20


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p / "absent.gguf", Reason.MISSING),
        (lambda p: p, Reason.IO_ERROR),
    ],
    ids=["missing-file", "directory"],
)
def test_unreadable_paths(tmp_path: Path, make: object, reason: Reason) -> None:
    assert callable(make)
    with pytest.raises(RegistryError) as err:
        read_gguf_info(make(tmp_path))
    assert err.value.reason is reason


def test_tiny_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(ManifestError, match="only 4 bytes"):
        read_gguf_info(path)
