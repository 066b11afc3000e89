"""The hub's presence (retained ``repo/meta/hub.presence``) and what devices do with it: after a
broker restart the device is back before the hub; what it asks then goes to a shared subscription
with no live member and is lost; when the hub announces itself the device asks again at once,
not after ``chunk_timeout_s`` (real Mosquitto, real hub server, real transfer)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from fleet.errors import ProtocolError
from fleet.messages import HubPresence
from hub.sync.serve import HubServer, ServeConfig
from tests.sync.broker import Broker
from tests.sync.helpers import enrolled_device, make_blob, new_repo, publish_model, running_device

pytestmark = pytest.mark.slow

CHUNK_TIMEOUT_S = 30.0


async def test_device_reasks_when_the_hub_returns_after_a_broker_restart(
    own_broker: Broker, tmp_path: Path
) -> None:
    repo = new_repo(tmp_path / "repo")
    manifest = publish_model(repo, make_blob(tmp_path / "m.gguf", 96 << 20), "m", chunk_size=512 << 10)
    enrolled_device(tmp_path / "dev", repo.path, "dev-a")
    # The hub reconnects 4 s after the restart, the device within a second.
    slow = replace(own_broker.client_config("hub"), backoff_min_s=4.0, backoff_max_s=4.0)
    hub = HubServer(ServeConfig(repo.path, tmp_path / "hub.db", slow, meta_poll_s=0.3))
    await hub.start()
    try:
        async with running_device(
            own_broker, tmp_path / "dev", "dev-a", window=4, chunk_timeout_s=CHUNK_TIMEOUT_S
        ) as dev:
            dev.metadata.on_hub_back = dev.fetcher.hub_back  # what SyncService wires
            first_session = hub.session
            update = asyncio.create_task(dev.update(only_deployed=True))
            deadline = time.monotonic() + 60
            while dev.fetcher.totals.bytes_received < 4 << 20:
                assert time.monotonic() < deadline and not update.done(), "the transfer did not start"
                await asyncio.sleep(0.01)
            await asyncio.to_thread(own_broker.restart, 0.5)
            restarted = time.monotonic()
            await asyncio.wait_for(update, CHUNK_TIMEOUT_S)
            took = time.monotonic() - restarted
        stats = dev.fetcher.transfers[-1]
        assert (tmp_path / "dev" / "registry" / "blobs" / "sha256" / manifest.sha256).is_file()
        assert hub.session != first_session, "the hub did not announce a new session"
        assert stats.reasked["hub_back"] >= 1, stats
        assert stats.reasked["timeout"] == 0, f"waited for chunk_timeout_s: {stats}"
        assert took < CHUNK_TIMEOUT_S / 2, f"{took:.1f}s after the restart"
        assert dev.metadata.hub_online is True
    finally:
        await hub.close()


PRESENCE_CASES = [
    pytest.param(b'{"at":1.0,"online":true,"session":"ab"}', HubPresence(True, "ab", 1.0), id="online"),
    pytest.param(b'{"at":1,"online":false,"session":""}', HubPresence(False, "", 1.0), id="offline"),
    pytest.param(
        b'{"at":1,"online":"yes","session":""}', "online must be true or false", id="online-not-bool"
    ),
    pytest.param(b'{"at":1,"online":true}', "missing session", id="no-session"),
    pytest.param(b'{"at":1,"online":true,"session":"","x":1}', "unknown x", id="unknown-field"),
    pytest.param(b'{"at":true,"online":true,"session":""}', "at must be a number", id="at-bool"),
]


@pytest.mark.parametrize(("raw", "expected"), PRESENCE_CASES)
def test_presence_messages_decode_strictly(raw: bytes, expected: HubPresence | str) -> None:
    if isinstance(expected, HubPresence):
        assert HubPresence.decode(raw) == expected
        assert HubPresence.decode(expected.encode()) == expected
        return
    with pytest.raises(ProtocolError, match=expected):
        HubPresence.decode(raw)
