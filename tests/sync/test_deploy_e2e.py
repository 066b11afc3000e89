"""End to end with the real Gemma model: `edge-hub serve` logic in-process, a device's sync service
with a real model pool. A deployment activates the model; a broken new version fails to load and
the previous version keeps serving, the failure reported to the hub."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.audit import AuditLog
from agent.device_key import DeviceKey
from agent.engine.base import ModelInfo
from agent.engine.llama import LlamaEngine
from agent.engine.pool import ModelPool, smoke_generate
from agent.sync.service import SyncOptions, SyncService
from hub.publish import set_deployment
from hub.serve import HubServer, ServeConfig
from tests.sync.broker import Broker
from tests.sync.helpers import enrolled_device, new_repo, publish_model

pytestmark = [pytest.mark.model, pytest.mark.slow]


def make_pool() -> ModelPool:
    def factory(info: ModelInfo) -> LlamaEngine:
        return LlamaEngine(info, n_ctx=256, n_threads=2, n_parallel=1, max_queue=4)

    return ModelPool(factory, smoke_timeout_s=60)


async def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_deploy_activates_then_broken_version_keeps_previous(
    broker: Broker, tmp_path: Path, gemma_path: Path
) -> None:
    repo = new_repo(tmp_path / "repo")
    v1 = publish_model(repo, gemma_path, "gemma", "1", chunk_size=4 << 20, group=None, name="model.gguf")
    set_deployment(repo, "edge", "gemma", version="1", pin=True)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gemma_path.read_bytes()[: 8 << 20])  # a real header, truncated tensors
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")

    hub = HubServer(ServeConfig(repo.path, tmp_path / "hub.db", broker.client_config("hub"), meta_poll_s=0.3))
    await hub.start()
    key = DeviceKey.generate()
    audit = AuditLog(tmp_path / "dev" / "audit.db", key=key)
    audit.start()
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

        publish_model(repo, broken, "gemma", "2", chunk_size=1 << 20, group=None, name="model.gguf")
        set_deployment(repo, "edge", "gemma", version="2", pin=True)
        await wait_for(
            lambda: any(e.status in ("load_failed", "smoke_test_failed") for e in sync.events_sent),
            120,
            "failure of v2",
        )
        assert pool.default_id == "gemma"
        assert pool.models()[0].path.name == v1.sha256  # the previous version keeps serving
        await smoke_generate(pool.resolve("gemma"))  # and answers
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
