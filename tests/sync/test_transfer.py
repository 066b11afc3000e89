"""Model transfer over a real Mosquitto: TUF refresh via retained metadata, verified chunks, resume."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.sync.errors import TransferError
from agent.sync.fetcher import ChunkPlan, ChunkTransfer, plan_from_target
from fleet.messages import Outgoing, device_topic
from registry.metadata import digest_file
from tests.sync.broker import Broker
from tests.sync.helpers import (
    enrolled_device,
    installed_files,
    make_blob,
    new_repo,
    publish_model,
    running_device,
    running_hub,
)


@pytest.mark.parametrize(
    "adopt", [pytest.param(True, id="renamed-into-store"), pytest.param(False, id="streamed-copy")]
)
async def test_device_installs_deployed_model_over_mqtt(broker: Broker, tmp_path: Path, adopt: bool) -> None:
    repo = new_repo(tmp_path / "repo")
    model = make_blob(tmp_path / "tiny.gguf", 5 * (1 << 20) + 123)
    manifest = publish_model(repo, model, "tiny")
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")
    async with (
        running_hub(broker, repo.path),
        running_device(broker, tmp_path / "dev", "dev-a", adopt=adopt) as dev,
    ):
        result = await dev.update()
        assert manifest.target_path in result.installed
        assert manifest.sha256 in installed_files(tmp_path / "dev")
        stats = dev.fetcher.transfers[-1]
        assert sorted(stats.requested) == list(range(6))
        assert max(stats.requested.values()) == 1
        # A second refresh finds everything installed and fetches nothing.
        again = await dev.update()
        assert manifest.target_path in again.already
    installed = tmp_path / "dev" / "registry" / "blobs" / "sha256" / manifest.sha256
    assert digest_file(installed).sha256 == manifest.sha256
    assert not list((tmp_path / "dev" / "sync" / "partial").glob("*.part"))


async def test_tampered_chunk_is_refused_and_reported(broker: Broker, tmp_path: Path) -> None:
    """A rogue publisher with hub rights keeps injecting bad bytes for every chunk: each is refused,
    the refusal reported, and the real chunks still complete the transfer."""
    repo = new_repo(tmp_path / "repo")
    model = make_blob(tmp_path / "m.gguf", 8 << 20)
    manifest = publish_model(repo, model, "m")
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")
    from fleet.mqtt import MqttClient

    rogue = MqttClient(broker.client_config("hub", client_id="rogue"))
    await rogue.start()
    await rogue.wait_connected(10)
    stop = asyncio.Event()

    async def inject() -> None:
        while not stop.is_set():
            for i in range(8):
                corr = f"{manifest.sha256}:{i}".encode()
                await rogue.publish(
                    Outgoing(
                        device_topic("dev-a", "blobs"),
                        b"\x00" * (1 << 20),
                        correlation=corr,
                        user=(("status", "ok"),),
                    )
                )
            await asyncio.sleep(0.005)

    try:
        async with (
            running_hub(broker, repo.path),
            running_device(broker, tmp_path / "dev", "dev-a", window=1) as dev,
        ):
            injector = asyncio.create_task(inject())
            await asyncio.sleep(0.2)  # junk is flowing before the transfer starts
            result = await dev.update()
            stop.set()
            await injector
            assert manifest.target_path in result.installed
            assert any(r == "chunk_hash_mismatch" for r, _ in dev.refusals)
    finally:
        stop.set()
        await rogue.close()
    installed = tmp_path / "dev" / "registry" / "blobs" / "sha256" / manifest.sha256
    assert digest_file(installed).sha256 == manifest.sha256


async def test_transfer_resumes_from_partial_file(broker: Broker, tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    model = make_blob(tmp_path / "m.gguf", 8 << 20)
    publish_model(repo, model, "m")
    digest = digest_file(model, 1 << 20)
    plan = ChunkPlan(digest.sha256, digest.size, digest.chunk_size, digest.chunk_sha256)
    partial = tmp_path / "partial"
    partial.mkdir()
    # Chunks 0-4 already on disk, chunk 5 torn (half written), the rest missing.
    data = model.read_bytes()
    (partial / f"{digest.sha256}.part").write_bytes(data[: 5 << 20] + data[5 << 20 : (5 << 20) + 1000])
    async with running_hub(broker, repo.path):
        from fleet.mqtt import MqttClient

        client = MqttClient(broker.client_config("dev-a"))
        await client.start()
        await client.wait_connected(10)
        try:
            transfer = ChunkTransfer(client, "dev-a", plan, partial, window=2)
            path = await transfer.run()
        finally:
            await client.close()
    assert transfer.stats.resumed_chunks == 5
    assert sorted(transfer.stats.requested) == [5, 6, 7]
    assert path.read_bytes() == data


PLAN_CASES = [
    pytest.param(
        100,
        {"manifest": {"chunk_sha256": ["a" * 64] * 2, "chunk_size": 4096, "file_size": 100}},
        id="more-chunks-than-the-size-needs",
    ),
    pytest.param(
        10000,
        {"manifest": {"chunk_sha256": ["a" * 64], "chunk_size": 4096, "file_size": 10000}},
        id="too-few-chunks",
    ),
    pytest.param(
        10000,
        {"manifest": {"chunk_sha256": ["a" * 64] * 3, "chunk_size": 4096, "file_size": 9}},
        id="file-size-differs-from-target",
    ),
    pytest.param(64 << 20, {}, id="large-target-without-chunk-hashes"),
]


@pytest.mark.parametrize(("length", "custom"), PLAN_CASES)
def test_inconsistent_chunk_plans_are_refused(length: int, custom: dict[str, object]) -> None:
    with pytest.raises(TransferError):
        plan_from_target(length, "b" * 64, custom)


async def test_not_enough_disk_is_refused_before_any_request(broker: Broker, tmp_path: Path) -> None:
    from fleet.mqtt import MqttClient

    huge = ChunkPlan("c" * 64, 1 << 46, 1 << 30, ("d" * 64,) * (1 << 16))
    client = MqttClient(broker.client_config("dev-a"))
    await client.start()
    await client.wait_connected(10)
    try:
        transfer = ChunkTransfer(client, "dev-a", huge, tmp_path)
        with pytest.raises(TransferError) as err:
            await transfer.run()
        assert err.value.status == "disk_full"
        assert not transfer.stats.requested
    finally:
        await client.close()


def test_adopting_store_refuses_a_partial_file_that_is_not_the_signed_blob(tmp_path: Path) -> None:
    """Chunks that each matched a plan but do not make the signed whole: refused, nothing installed,
    and the partial file deleted so no later resume starts from it."""
    from agent.sync.fetcher import AdoptingStore
    from registry.exceptions import Refused

    part = tmp_path / "partial" / "x.part"
    part.parent.mkdir()
    part.write_bytes(b"not the model" * 1000)
    signed = "e" * 64
    store = AdoptingStore(tmp_path / "blobs", lambda sha, length: part)
    with pytest.raises(Refused) as err:
        store.install(iter(()), name="models/m/1/f", length=13000, sha256=signed)
    assert err.value.reason.value == "blob_hash_mismatch"
    assert not store.has(signed)
    assert not part.exists()
