"""End to end with the real Gemma model: `edge-hub serve` logic in-process, a device's sync service
with a real model pool. A deployment activates the model; a broken new version fails to load and
the previous version keeps serving; a version that loads but fails its smoke test is refused the
same way; the failures are reported to the hub."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.engine.pool import SMOKE_PROMPT, ModelPool, smoke_generate
from agent.sync.service import SyncOptions, SyncService
from registry.publish import set_deployment
from registry.repository import Repository
from tests.sync.broker import Broker
from tests.sync.helpers import (
    device_audit,
    enrolled_device,
    new_repo,
    publish_model,
    small_llama_pool,
    started_hub_server,
    wait_for,
)

pytestmark = [pytest.mark.model, pytest.mark.slow]


def make_silent_model(source: Path, dest: Path) -> None:
    """A copy of ``source`` whose end-of-generation token is the first token it generates for the
    pool's smoke prompt (greedy): it loads, but its smoke test produces no tokens."""
    import shutil

    from gguf import GGUFReader
    from llama_cpp import Llama

    llm = Llama(str(source), n_ctx=128, n_threads=2, verbose=False)
    try:
        out = llm.create_completion(SMOKE_PROMPT, max_tokens=1, temperature=0.0, top_k=1)
        assert isinstance(out, dict)  # not streamed
        text = out["choices"][0]["text"]
        prompt = llm.tokenize(SMOKE_PROMPT.encode())
        full = llm.tokenize((SMOKE_PROMPT + text).encode())
    finally:
        llm.close()
    assert full[: len(prompt)] == prompt and len(full) > len(prompt), (text, prompt, full)
    first = full[len(prompt)]
    shutil.copyfile(source, dest)
    reader = GGUFReader(dest, "r+")
    field = reader.get_field("tokenizer.ggml.eos_token_id")
    assert field is not None
    field.parts[field.data[0]][0] = first
    reader.data.flush()
    del reader


def make_pool() -> ModelPool:
    return small_llama_pool()


async def test_deploy_activates_then_broken_version_keeps_previous(
    broker: Broker, tmp_path: Path, gemma_path: Path
) -> None:
    repo = new_repo(tmp_path / "repo")
    v1 = publish_model(repo, gemma_path, "gemma", "1", chunk_size=4 << 20, group=None, name="model.gguf")
    set_deployment(repo, "edge", "gemma", version="1", pin=True)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gemma_path.read_bytes()[: 8 << 20])  # a real header, truncated tensors
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")

    hub = await started_hub_server(repo.path, tmp_path, broker)
    audit, key = device_audit(tmp_path / "dev", hub)
    pool = make_pool()
    options = SyncOptions(
        "dev-a",
        broker.client_config("dev-a"),
        refresh_interval_s=2.0,
        state_interval_s=1.0,
        audit_key_hex=key.public.raw.hex(),
    )
    sync = SyncService(options, tmp_path / "dev", pool, audit=audit)
    try:
        started = time.monotonic()
        await sync.start()
        await wait_for(
            lambda: any(e.status == "activated" for e in sync.events_sent), 240, "activation of v1"
        )
        assert pool.default_id == "gemma"
        serving = pool.models()[0]
        assert serving.path.name == v1.sha256
        print(f"deploy -> serving: {time.monotonic() - started:.1f}s")

        publish_model(
            Repository.open(repo.path),
            broken,
            "gemma",
            "2",
            chunk_size=1 << 20,
            group=None,
            name="model.gguf",
        )
        set_deployment(Repository.open(repo.path), "edge", "gemma", version="2", pin=True)
        await wait_for(
            lambda: any(e.status in ("load_failed", "smoke_test_failed") for e in sync.events_sent),
            120,
            "failure of v2",
        )
        assert pool.default_id == "gemma"
        assert pool.models()[0].path.name == v1.sha256  # the previous version keeps serving
        await smoke_generate(pool.resolve("gemma"))  # and answers

        # v3 loads fine but fails its smoke test: its end-of-generation token is the very token the
        # smoke prompt produces first, so it answers nothing.
        eos = tmp_path / "eos.gguf"
        make_silent_model(gemma_path, eos)
        publish_model(
            Repository.open(repo.path), eos, "gemma", "3", chunk_size=4 << 20, group=None, name="model.gguf"
        )
        set_deployment(Repository.open(repo.path), "edge", "gemma", version="3", pin=True)
        await wait_for(
            lambda: any(e.status == "smoke_test_failed" for e in sync.events_sent), 240, "v3 smoke failure"
        )
        assert pool.models()[0].path.name == v1.sha256  # still the previous version
        await smoke_generate(pool.resolve("gemma"))

        store = hub.store
        assert store is not None
        await wait_for(
            lambda: any(e.status in ("load_failed", "smoke_test_failed") for _, e in store.events("dev-a")),
            20,
            "the failure at the hub",
        )
        await wait_for(lambda: any(r.state is not None for r in store.devices()), 20, "reported state")
        row = next(r for r in store.devices() if r.device == "dev-a")
        assert row.state is not None and row.state.selected_model == "gemma"
        # The activation and the failure are in the device's audit log, uploaded to the hub.
        await wait_for(lambda: audit.backlog() == 0, 30, "audit upload")
        actions = [r["action"] for r in store.audit_records("dev-a")]
        assert "deployment.activate" in actions
        assert store.verify_device("dev-a")[1] == []
    finally:
        await sync.close()
        await hub.close()
        await pool.close()
        audit.close()
