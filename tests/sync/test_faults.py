"""Fault and attack tests with the real Mosquitto: broker restart mid-transfer, SIGKILL of the device
at random points, stale metadata from a rogue publisher, two blob worker processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.messages import Outgoing, meta_topic
from fleet.mqtt import MqttClient
from hub.sync.meta import refresh_timestamp
from registry.metadata import digest_file
from tests.sync.broker import REPO, Broker
from tests.sync.helpers import (
    enrolled_device,
    make_blob,
    new_repo,
    publish_model,
    running_device,
    running_hub,
)

pytestmark = pytest.mark.slow


def store_is_sound(state_dir: Path) -> list[str]:
    """Every blob under its final name hashes to that name; returns the installed digests."""
    blobs = state_dir / "registry" / "blobs" / "sha256"
    names = sorted(p.name for p in blobs.iterdir() if not p.name.startswith(".")) if blobs.is_dir() else []
    for name in names:
        assert hashlib.sha256((blobs / name).read_bytes()).hexdigest() == name, f"corrupt blob {name}"
    return names


async def test_broker_restart_mid_transfer_completes_without_refetching(
    own_broker: Broker, tmp_path: Path
) -> None:
    repo = new_repo(tmp_path / "repo")
    model = make_blob(tmp_path / "m.gguf", 48 << 20)
    manifest = publish_model(repo, model, "m", chunk_size=512 << 10)
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")
    window = 4
    async with (
        running_hub(own_broker, repo.path),
        running_device(own_broker, tmp_path / "dev", "dev-a", window=window, chunk_timeout_s=5) as dev,
    ):
        update = asyncio.create_task(dev.update())
        partial = tmp_path / "dev" / "sync" / "partial" / f"{manifest.sha256}.part"
        deadline = time.monotonic() + 60
        while not partial.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        own_broker.restart(down_s=1.0)
        result = await asyncio.wait_for(update, 120)
    assert manifest.target_path in result.installed
    stats = dev.fetcher.transfers[-1]
    assert dev.client.connects >= 2, "the broker restart did not interrupt the transfer"
    twice = [i for i, n in stats.requested.items() if n > 1]
    assert len(twice) <= window, f"chunks asked again beyond one window: {twice}"
    assert stats.duplicates <= window, f"{stats.duplicates} chunks fetched twice"
    assert manifest.sha256 in store_is_sound(tmp_path / "dev")


KILL_POINTS = 20


def test_sigkill_at_random_points_never_exposes_a_partial_model(broker: Broker, tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    model = make_blob(tmp_path / "m.gguf", 12 << 20)
    manifest = publish_model(repo, model, "m", chunk_size=128 << 10)

    async def hub_forever(stop: asyncio.Event) -> None:
        async with running_hub(broker, repo.path):
            await stop.wait()

    def run_device(state: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.sync.device_proc",
                str(state),
                str(broker.port),
                str(broker.certdir),
                "dev-a",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    async def scenario() -> None:
        stop = asyncio.Event()
        hub = asyncio.create_task(hub_forever(stop))
        await asyncio.sleep(0.5)
        try:
            # Measure one whole run to spread the kill points over it.
            ref = tmp_path / "ref"
            enrolled_device(ref, repo.path, "dev-a")
            proc = run_device(ref)
            assert proc.stdout is not None
            await asyncio.to_thread(proc.stdout.readline)
            t0 = time.monotonic()
            out, _ = await asyncio.to_thread(proc.communicate, None, 120)
            duration = time.monotonic() - t0
            assert proc.returncode == 0, out
            rnd = random.Random(7)
            kills = runs = 0
            n = 0

            def fresh() -> Path:
                nonlocal n
                n += 1
                return enrolled_device(tmp_path / f"dev{n}", repo.path, "dev-a").dir.parent

            state = fresh()
            while kills < KILL_POINTS and runs < 4 * KILL_POINTS:
                runs += 1
                partial = state / "sync" / "partial" / f"{manifest.sha256}.part"
                proc = run_device(state)
                assert proc.stdout is not None
                await asyncio.to_thread(proc.stdout.readline)  # "ready": the update starts
                await asyncio.sleep(rnd.uniform(0.0, duration))
                proc.send_signal(signal.SIGKILL)
                out, _ = await asyncio.to_thread(proc.communicate, None, 30)
                installed = store_is_sound(state)  # never a corrupt blob under its final name
                index_file = state / "registry" / "installed.json"
                index = index_file.read_text() if index_file.exists() else ""
                if manifest.sha256 not in installed:
                    assert manifest.target_path not in index, "the index names a blob that is not installed"
                if out.strip():  # it completed before the kill: go on with a new device
                    assert manifest.sha256 in installed, out
                    state = fresh()
                elif partial.exists():
                    kills += 1
            assert kills == KILL_POINTS, f"{kills} kills mid-transfer in {runs} runs"
            print(
                f"{kills} kills mid-transfer in {runs} runs over {n} devices; whole transfer {duration:.2f}s"
            )
            had_partial = (state / "sync" / "partial" / f"{manifest.sha256}.part").exists()
            proc = run_device(state)
            out, _ = await asyncio.to_thread(proc.communicate, None, 120)
            assert proc.returncode == 0
            report = json.loads(out.decode().strip().splitlines()[-1])
            assert manifest.sha256 in store_is_sound(state)
            assert report["installed"] or report["already"]
            if had_partial:  # the final run resumed from the chunks the killed runs left on disk
                assert sum(t["resumed"] for t in report["transfers"]) > 0
            final_state.append(state)
        finally:
            stop.set()
            await hub

    final_state: list[Path] = []
    asyncio.run(scenario())
    installed = final_state[0] / "registry" / "blobs" / "sha256" / manifest.sha256
    assert digest_file(installed).sha256 == manifest.sha256


async def test_stale_metadata_from_a_rogue_publisher_is_refused_and_audited(
    broker: Broker, tmp_path: Path
) -> None:
    repo = new_repo(tmp_path / "repo")
    publish_model(repo, make_blob(tmp_path / "m.gguf", 1 << 20), "m")
    stale = (repo.path / "metadata" / "timestamp.json").read_bytes()
    refresh_timestamp(repo.path)  # the hub re-signs: devices see a newer timestamp
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")
    rogue = MqttClient(broker.client_config("hub", client_id="rogue"))
    async with (
        running_hub(broker, repo.path) as hub,
        running_device(broker, tmp_path / "dev", "dev-a") as dev,
    ):
        await dev.update()  # trusts the current timestamp
        await rogue.start()
        await rogue.wait_connected(10)
        try:
            await rogue.publish(Outgoing(meta_topic("timestamp.json"), stale, retain=True))
            await asyncio.sleep(0.3)
            from registry.exceptions import Refused

            with pytest.raises(Refused) as err:
                await dev.update()
            assert err.value.reason.value == "rollback"
            assert any(reason == "rollback" for reason, _ in dev.refusals)
        finally:
            await rogue.close()
            await hub.meta.sync(force=True)  # the hub restores the real metadata


async def test_two_blob_worker_processes_share_the_requests(broker: Broker, tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    model = make_blob(tmp_path / "m.gguf", 16 << 20)
    manifest = publish_model(repo, model, "m", chunk_size=256 << 10)
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")
    cert = broker.certdir
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hub.sync.worker",
                "--role",
                "blobs",
                "--repo",
                str(repo.path),
                "--db",
                str(tmp_path / "hub.db"),
                "--host",
                "127.0.0.1",
                "--port",
                str(broker.service_port),
                "--ca",
                str(cert / "ca.crt"),
                "--cert",
                str(cert / "hub.crt"),
                "--key",
                str(cert / "hub.key"),
                "--client-id",
                f"worker-{i}",
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    try:
        meta_client = MqttClient(broker.client_config("hub", client_id="meta-only"))
        await meta_client.start()
        await meta_client.wait_connected(10)
        from hub.sync.meta import MetaPublisher

        await MetaPublisher(meta_client, repo.path).sync(force=True)
        await asyncio.sleep(1.5)  # both workers subscribed
        async with running_device(broker, tmp_path / "dev", "dev-a", window=8) as dev:
            result = await dev.update()
        await meta_client.close()
    finally:
        outputs = []
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            out, _ = w.communicate(timeout=20)
            outputs.append(out.decode())
    assert manifest.target_path in result.installed
    served = [_served(o) for o in outputs]
    assert all(n > 0 for n in served), f"chunks served per worker: {served}"
    assert sum(served) >= 64


def _served(output: str) -> int:
    for line in output.splitlines():
        if "blob_worker_stats" in line:
            return int(json.loads(line)["chunks"])
    raise AssertionError(f"no stats in worker output: {output[-2000:]}")
