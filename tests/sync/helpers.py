"""Building blocks of the sync tests: a real signed repository, a device, a hub, all in-process."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.audit.store import AuditLog
from agent.engine.base import ModelInfo
from agent.engine.pool import ModelPool
from agent.sync.fetcher import MqttFetcher, RetainedMetadata, attach, trusted_plans
from agent.sync.gate import TransferGate
from agent.sync.service import SyncOptions, SyncService
from fleet.device_key import DeviceKey
from fleet.mqtt import MqttClient, MqttConfig
from hub.sync.blobs import BlobIndex, BlobServer
from hub.sync.meta import MetaPublisher
from hub.sync.serve import HubServer, ServeConfig
from registry.device import DeviceRegistry, ImportResult
from registry.metadata import (
    Deployment,
    DeploymentEntry,
    ModelManifest,
    deployment_target_path,
    digest_file,
)
from registry.repository import Repository
from tests.fakes.engine import FakeBehaviour, FakeFactory
from tests.sync.broker import Broker


def make_blob(path: Path, size: int, seed: int = 1) -> Path:
    """A deterministic pseudo-random file (stands in for a model where the content does not matter)."""
    import random

    rnd = random.Random(seed)
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(left, 1 << 20)
            fh.write(rnd.randbytes(n))
            left -= n
    return path


def publish_model(
    repo: Repository,
    source: Path,
    model_id: str,
    version: str = "1",
    *,
    chunk_size: int = 1 << 20,
    group: str | None = "edge",
    name: str | None = None,
) -> ModelManifest:
    digest = digest_file(source, chunk_size)
    manifest = ModelManifest(
        id=model_id,
        version=version,
        family="test",
        parameters=1_000_000,
        quantization="Q4_K_M",
        format="gguf",
        task="completion",
        file_name=name or source.name,
        file_size=digest.size,
        sha256=digest.sha256,
        chunk_size=chunk_size,
        chunk_sha256=digest.chunk_sha256,
    )
    repo.add_file(manifest.target_path, source, digest.sha256, manifest.to_custom())
    if group is not None:
        deployment = Deployment(group, (DeploymentEntry(model_id, version),))
        repo.add_bytes(deployment_target_path(group), deployment.to_json(), {"kind": "deployment"})
    repo.publish()
    return manifest


def new_repo(path: Path) -> Repository:
    return Repository.init(path)


def enrolled_device(
    state_dir: Path, repo_dir: Path, device_id: str, groups: tuple[str, ...] = ("edge",)
) -> DeviceRegistry:
    reg = DeviceRegistry(state_dir, on_refusal=lambda r, d: None)
    reg.enroll((repo_dir / "metadata" / "1.root.json").read_bytes(), device_id, groups)
    return reg


@dataclass
class Hub:
    client: MqttClient
    meta: MetaPublisher
    blobs: BlobServer


@asynccontextmanager
async def running_hub(broker: Broker, repo_dir: Path, client_id: str | None = None) -> AsyncIterator[Hub]:
    client = MqttClient(broker.client_config("hub", client_id=client_id or f"hub-{os.urandom(4).hex()}"))
    await client.start()
    await client.wait_connected(10)
    meta = MetaPublisher(client, repo_dir)
    blobs = BlobServer(client, BlobIndex(repo_dir / "targets"))
    await blobs.start()
    await meta.sync(force=True)

    async def republish(_present: bool) -> None:
        await meta.sync(force=True)

    client.on_connect(republish)
    try:
        yield Hub(client, meta, blobs)
    finally:
        blobs.close()
        await client.close(end_session=True)


@dataclass
class Device:
    client: MqttClient
    registry: DeviceRegistry
    metadata: RetainedMetadata
    fetcher: MqttFetcher
    refusals: list[tuple[str, str]] = field(default_factory=list)

    async def update(self, *, only_deployed: bool = False) -> ImportResult:
        """``DeviceRegistry.update`` over MQTT; ``only_deployed`` as the sync service calls it."""
        return await asyncio.to_thread(self.registry.update, self.fetcher, only_deployed=only_deployed)


@asynccontextmanager
async def running_device(
    broker: Broker,
    state_dir: Path,
    device_id: str,
    *,
    window: int = 4,
    chunk_timeout_s: float = 10.0,
    adopt: bool = True,
    mirrors: tuple[str, ...] | Callable[[], list[str]] = (),
    gate: TransferGate | None = None,
    mirror_ca_file: Path | None = None,
    mirror_timeout_s: float = 5.0,
) -> AsyncIterator[Device]:
    client = MqttClient(broker.client_config(device_id))
    await client.start()
    await client.wait_connected(10)
    metadata = RetainedMetadata(client, wait_s=5.0)
    await metadata.start()
    refusals: list[tuple[str, str]] = []
    registry = DeviceRegistry(state_dir, on_refusal=lambda r, d: refusals.append((r, d)))
    fetcher = MqttFetcher(
        asyncio.get_running_loop(),
        client,
        device_id,
        metadata,
        trusted_plans(registry.metadata_dir),
        state_dir / "sync" / "partial",
        window=window,
        chunk_timeout_s=chunk_timeout_s,
        on_refusal=lambda r, d: refusals.append((r, d)),
        mirrors=mirrors,
        gate=gate,
        mirror_ca_file=mirror_ca_file,
        mirror_timeout_s=mirror_timeout_s,
    )
    if adopt:
        attach(registry, fetcher)
    try:
        yield Device(client, registry, metadata, fetcher, refusals)
    finally:
        await client.close()


def installed_files(state_dir: Path) -> list[str]:
    blobs = state_dir / "registry" / "blobs" / "sha256"
    return sorted(os.listdir(blobs)) if blobs.is_dir() else []


async def wait_for(predicate: Callable[[], object], timeout: float, what: str, poll_s: float = 0.1) -> None:
    """Poll ``predicate`` until it is true; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(poll_s)


def offline_service(
    state_dir: Path, certdir: Path, behaviours: dict[str, FakeBehaviour] | None = None
) -> SyncService:
    """A sync service with real TLS material and fake engines; port 1 is never dialled (the
    service is not started): for driving its activation and bookkeeping directly."""
    config = MqttConfig(
        "127.0.0.1", 1, "dev-a", certdir / "ca.crt", certdir / "dev-a.crt", certdir / "dev-a.key"
    )
    pool = ModelPool(FakeFactory(behaviours), smoke_timeout_s=5.0, settle_s=0.0)
    return SyncService(SyncOptions("dev-a", config), state_dir, pool)


def installed_blob(sync: SyncService, content: bytes, model: str) -> ModelInfo:
    """Put ``content`` into the service's store as a blob and describe it as a GGUF model."""
    sha = hashlib.sha256(content).hexdigest()
    path = sync.registry.store.path(sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return ModelInfo(id=model, path=path, format="gguf", task="completion", size_bytes=len(content))


def small_llama_pool(**options: Any) -> ModelPool:
    """A pool building real llama.cpp engines small enough for the tests (context 256, one slot)."""
    from agent.engine.llama import LlamaEngine

    def factory(info: ModelInfo) -> LlamaEngine:
        return LlamaEngine(info, n_ctx=256, n_threads=2, n_parallel=1, max_queue=4)

    return ModelPool(factory, **({"smoke_timeout_s": 60} | options))


async def started_hub_server(repo_dir: Path, work: Path, broker: Broker) -> HubServer:
    """``edge-hub serve`` in process over ``repo_dir``, its database in ``work``."""
    hub = HubServer(ServeConfig(repo_dir, work / "hub.db", broker.client_config("hub"), meta_poll_s=0.3))
    await hub.start()
    return hub


def device_audit(
    dev_dir: Path, hub: HubServer | None = None, device: str = "dev-a"
) -> tuple[AuditLog, DeviceKey]:
    """The device's audit log (started) under ``dev_dir`` and the key that signs it, registered
    with ``hub``'s store when given (as ``edge-hub device register`` does)."""
    key = DeviceKey.generate()
    if hub is not None:
        assert hub.store is not None
        hub.store.register_key(device, key.public.raw.hex())
    audit = AuditLog(dev_dir / "audit.db", key=key)
    audit.start()
    return audit, key


__all__ = [
    "device_audit",
    "small_llama_pool",
    "started_hub_server",
    "installed_blob",
    "offline_service",
    "Device",
    "Hub",
    "enrolled_device",
    "installed_files",
    "make_blob",
    "new_repo",
    "publish_model",
    "running_device",
    "running_hub",
    "wait_for",
]
