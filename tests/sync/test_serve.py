"""`edge-hub serve` logic: the scheduled timestamp re-signing reaches devices as retained metadata."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from agent.sync.fetcher import RetainedMetadata
from fleet.mqtt import MqttClient
from hub.sync.serve import HubServer, ServeConfig
from tests.sync.broker import Broker
from tests.sync.helpers import new_repo


def _version(raw: bytes) -> int:
    return int(json.loads(raw)["signed"]["version"])


async def test_timestamp_is_resigned_on_schedule_and_republished(own_broker: Broker, tmp_path: Path) -> None:
    repo = new_repo(tmp_path / "repo")
    first = _version((repo.path / "metadata" / "timestamp.json").read_bytes())
    hub = HubServer(
        ServeConfig(repo.path, tmp_path / "hub.db", own_broker.client_config("hub"), timestamp_interval_s=1.0)
    )
    dev = MqttClient(own_broker.client_config("dev-a"))
    await hub.start()
    try:
        await dev.start()
        await dev.wait_connected(10)
        meta = RetainedMetadata(dev)
        seen: list[int] = []
        meta.on_timestamp = lambda: seen.append(_version(meta.files["timestamp.json"]))
        await meta.start()
        deadline = time.monotonic() + 20
        while (not seen or max(seen) < first + 2) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    finally:
        await dev.close()
        await hub.close()
    assert seen and max(seen) >= first + 2, seen  # re-signed at least twice, each time republished
    assert _version((repo.path / "metadata" / "timestamp.json").read_bytes()) >= max(seen)
