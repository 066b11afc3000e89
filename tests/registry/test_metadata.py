"""Manifests, deployments and target paths: round trips and tables of refused inputs."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from registry.exceptions import ManifestError, Reason, Refused
from registry.metadata import (
    CompanionFile,
    Deployment,
    DeploymentEntry,
    ModelManifest,
    digest_file,
    model_target_path,
    parse_target_path,
    size_class,
)

H = "ab" * 32


def manifest(**changes: Any) -> ModelManifest:
    base: dict[str, Any] = {
        "id": "gemma-3-270m",
        "version": "1",
        "family": "gemma3",
        "parameters": 268_098_176,
        "quantization": "Q4_K_M",
        "format": "gguf",
        "task": "completion",
        "file_name": "model.gguf",
        "file_size": 10_000,
        "sha256": H,
        "chunk_size": 4096,
        "chunk_sha256": (H, H, H),
        "context_length": 32768,
        "n_layers": 18,
        "n_heads": 4,
        "n_kv_heads": 1,
        "embedding_length": 640,
        "sliding_window": 512,
        "vocab_size": 262144,
        "chat_template": "{{ messages }}",
        "licence": "gemma",
        "min_cpu_features": ("avx2",),
    }
    base.update(changes)
    return ModelManifest(**base)


def test_manifest_round_trips_through_custom_and_json() -> None:
    m = manifest(companions=("tokenizer.json",), inputs=("input_ids",), outputs=("out",), opset=17)
    assert ModelManifest.from_custom(m.to_custom()) == m
    assert ModelManifest.from_json(m.to_json()) == m
    assert m.to_json_dict()["size_class"] == "micro"
    assert m.target_path == "models/gemma-3-270m/1/model.gguf"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"id": "Gemma"}, "bad model id"),
        ({"id": "../x"}, "bad model id"),
        ({"version": ""}, "bad version"),
        ({"parameters": 0}, "must be positive"),
        ({"parameters": 31_000_000_000}, "larger than the medium class"),
        ({"format": "safetensors"}, "format must be gguf or onnx"),
        ({"task": "vision"}, "task must be"),
        ({"file_name": ".hidden"}, "bad file name"),
        ({"file_name": "a/b"}, "bad file name"),
        ({"sha256": "AB" * 32}, "sha256 must be 64 lowercase hex"),
        ({"chunk_sha256": (H, H)}, "expected 3 chunk hashes"),
        ({"chunk_size": 100}, "chunk_size must be between"),
        ({"file_size": 0}, "file_size must be a positive int"),
        ({"n_layers": -1}, "n_layers must be a positive int"),
        ({"n_heads": True}, "n_heads must be a positive int"),
        ({"min_cpu_features": ("AVX 2",)}, "bad min_cpu_features"),
        ({"companions": ("model.gguf",)}, "bad companions"),
        ({"licence": ""}, "licence must be"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_invalid_manifest_fields_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ManifestError, match=message) as info:
        manifest(**changes)
    assert info.value.reason is Reason.MALFORMED


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(extra=1), "unknown manifest fields: extra"),
        (lambda d: d.update(size_class="small"), "does not match"),
        (lambda d: d.update(chunk_sha256="ab"), "chunk_sha256 must be a list"),
        (lambda d: d.pop("sha256"), "manifest: "),
    ],
    ids=["unknown-field", "wrong-size-class", "chunks-not-a-list", "missing-field"],
)
def test_invalid_manifest_json_is_refused(edit: Any, message: str) -> None:
    data = manifest().to_json_dict()
    edit(data)
    with pytest.raises(ManifestError, match=message):
        ModelManifest.from_json_dict(data)


@pytest.mark.parametrize(
    ("raw", "message"),
    [(b"[1]", "must be a JSON object"), (b"{", "not valid JSON"), (b" " * (2 << 20), "larger than")],
    ids=["not-an-object", "not-json", "too-large"],
)
def test_manifest_from_bad_bytes(raw: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        ModelManifest.from_json(raw)


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (22_000_000, "micro"),
        (270_000_000, "micro"),
        (1_400_000_000, "micro"),
        (1_500_000_000, "small"),
        (13_900_000_000, "small"),
        (14_000_000_000, "medium"),
        (30_000_000_000, "medium"),
    ],
    ids=["22M", "270M", "1.4B", "1.5B", "13.9B", "14B", "30B"],
)
def test_size_classes(parameters: int, expected: str) -> None:
    assert size_class(parameters) == expected


@pytest.mark.parametrize(
    ("path", "kind", "name"),
    [
        ("models/gemma-3-270m/1/model.gguf", "model", "gemma-3-270m"),
        ("models/minilm/2.0.1/tokenizer.json", "model", "minilm"),
        ("policies/default.json", "policy", "default"),
        ("deployments/lab.json", "deployment", "lab"),
    ],
)
def test_valid_target_paths(path: str, kind: str, name: str) -> None:
    ref = parse_target_path(path)
    assert (ref.kind, ref.name, ref.path) == (kind, name, path)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "/etc/passwd",
        "models/../etc/passwd",
        "models/./x/1/model.gguf",
        "models//1/model.gguf",
        "models/x/1/.model.gguf",
        "models/x/1/mo del.gguf",
        "models/x/1/mödel.gguf",
        "models/x\\1/model.gguf",
        "models/X/1/model.gguf",
        "models/x/1",
        "policies/default.yaml",
        "deployments/a/b.json",
        "bin/sh",
        "models/x/1/" + "a" * 400,
    ],
    ids=[
        "empty",
        "absolute",
        "dotdot",
        "dot",
        "empty-segment",
        "hidden",
        "space",
        "non-ascii",
        "backslash",
        "uppercase-id",
        "too-short",
        "policy-not-json",
        "nested-deployment",
        "unknown-area",
        "too-long",
    ],
)
def test_unsafe_target_paths_are_refused(path: str) -> None:
    with pytest.raises(Refused) as info:
        parse_target_path(path)
    assert info.value.reason is Reason.BAD_PATH


def test_deployment_pins_one_model_and_round_trips() -> None:
    dep = (
        Deployment("lab")
        .with_model(DeploymentEntry("a", pin=True))
        .with_model(DeploymentEntry("b", "2", pin=True))
    )
    assert [(m.model, m.pin) for m in dep.models] == [("a", False), ("b", True)]
    assert Deployment.from_json(dep.to_json()) == dep


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"group": "lab", "models": [{"model": "a"}, {"model": "a"}]}', "appears twice"),
        (
            b'{"group": "lab", "models": [{"model": "a", "pin": true}, {"model": "b", "pin": true}]}',
            "at most one",
        ),
        (b'{"group": "lab", "maintenance_window": "25:00-01:00"}', "maintenance_window"),
        (b'{"group": "Lab"}', "bad group"),
        (b'{"group": "lab", "models": [{"model": "a", "extra": 1}]}', "deployment: "),
        (b'{"group": "lab", "owner": "x"}', "unknown deployment fields"),
    ],
    ids=["duplicate-model", "two-pins", "bad-window", "bad-group", "unknown-entry-field", "unknown-field"],
)
def test_invalid_deployments_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        Deployment.from_json(raw)


def test_companion_round_trip_and_digest_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 50
    path.write_bytes(data)
    d = digest_file(path, 4096)
    assert d.sha256 == hashlib.sha256(data).hexdigest()
    assert d.chunk_sha256 == tuple(
        hashlib.sha256(data[i : i + 4096]).hexdigest() for i in range(0, len(data), 4096)
    )
    c = CompanionFile(
        "minilm", "1", "tokenizer.json", "tokenizer", d.size, d.sha256, d.chunk_size, d.chunk_sha256
    )
    assert CompanionFile.from_custom(c.to_custom()) == c
    with pytest.raises(ManifestError, match="chunk hashes"):
        dataclasses.replace(c, chunk_sha256=d.chunk_sha256[:-1])


@given(st.text(max_size=80))
def test_any_text_is_either_a_safe_target_path_or_refused_as_bad_path(text: str) -> None:
    try:
        ref = parse_target_path(text)
    except Refused as exc:
        assert exc.reason is Reason.BAD_PATH
        return
    parts = ref.path.split("/")
    assert not ref.path.startswith("/") and ".." not in parts and "" not in parts
    assert all(p[0] not in "._-" and p.isascii() and " " not in p for p in parts)


@given(
    st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
)
def test_model_target_paths_round_trip(model_id: str, version: str, file_name: str) -> None:
    ref = parse_target_path(model_target_path(model_id, version, file_name))
    assert (ref.kind, ref.name, ref.version, ref.file_name) == ("model", model_id, version, file_name)


@pytest.mark.parametrize(
    ("mirrors", "error"),
    [
        pytest.param(("https://cdn.example/edge/targets/",), None, id="https"),
        pytest.param(("http://10.0.0.5:8080/t/", "https://b.example/"), None, id="two"),
        pytest.param(("ftp://x.example/",), "bad mirror URL", id="scheme"),
        pytest.param(("https://a:b@x.example/",), "bad mirror URL", id="credentials"),
        pytest.param(("https://x.example/?k=1",), "bad mirror URL", id="query"),
        pytest.param(("https:///nohost",), "bad mirror URL", id="no-host"),
    ],
)
def test_deployment_mirrors(mirrors: tuple[str, ...], error: str | None) -> None:
    from registry.metadata import Deployment, DeploymentEntry

    if error is not None:
        with pytest.raises(ManifestError, match=error):
            Deployment("lab", (DeploymentEntry("m"),), mirrors=mirrors)
        return
    dep = Deployment("lab", (DeploymentEntry("m"),), mirrors=mirrors)
    assert Deployment.from_json(dep.to_json()) == dep
    assert b"mirrors" not in Deployment("lab", (DeploymentEntry("m"),)).to_json()
