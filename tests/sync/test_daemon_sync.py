"""The real daemon with a [hub] section: it serves locally while the broker is down, then syncs,
installs and serves the deployed model, and reports to the hub."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from hub.sync.serve import HubServer, ServeConfig
from registry.publish import set_deployment
from tests.daemon import accepts, running_daemon, uds_client
from tests.sync.broker import Broker
from tests.sync.helpers import enrolled_device, new_repo, publish_model

pytestmark = [pytest.mark.model, pytest.mark.slow]


async def test_daemon_serves_offline_then_syncs_and_serves_the_deployed_model(
    own_broker: Broker, tmp_path: Path, gemma_path: Path
) -> None:
    repo = new_repo(tmp_path / "repo")
    publish_model(repo, gemma_path, "gemma", "1", chunk_size=4 << 20, group=None, name="model.gguf")
    set_deployment(repo, "edge", "gemma", pin=True)
    state = tmp_path / "agent"
    enrolled_device(state, repo.path, "dev-a")
    c = own_broker.certdir
    env = {
        "EDGE_AGENT_HUB__HOST": "127.0.0.1",
        "EDGE_AGENT_HUB__PORT": str(own_broker.port),
        "EDGE_AGENT_HUB__CA_FILE": str(c / "ca.crt"),
        "EDGE_AGENT_HUB__CERT_FILE": str(c / "dev-a.crt"),
        "EDGE_AGENT_HUB__KEY_FILE": str(c / "dev-a.key"),
        "EDGE_AGENT_HUB__BACKOFF_MIN_S": "0.2",
        "EDGE_AGENT_HUB__BACKOFF_MAX_S": "1.0",
        "EDGE_AGENT_HUB__STATE_INTERVAL_S": "1",
        "EDGE_AGENT_ENGINE__N_THREADS": "2",
    }
    own_broker.stop()
    with running_daemon(state, None, env=env, wait=False) as daemon:
        deadline = time.monotonic() + 60
        while not accepts(daemon.socket) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # The hub is unreachable: the daemon answers locally all the same.
        health = await asyncio.to_thread(daemon.health)
        assert health["status"] in ("ok", "degraded", "loading", "starting", "no_model")
        own_broker.start()
        hub = HubServer(ServeConfig(repo.path, tmp_path / "hub.db", own_broker.client_config("hub")))
        await hub.start()
        try:
            store = hub.store
            assert store is not None
            deadline = time.monotonic() + 300
            serving = False
            while time.monotonic() < deadline and not serving:
                await asyncio.sleep(0.5)
                rows = [r for r in store.devices() if r.device == "dev-a"]
                serving = bool(
                    rows and rows[0].state and rows[0].state.selected_model == "gemma" and rows[0].online
                )
            assert serving, daemon.log_path.read_text()[-3000:]

            def complete() -> dict[str, object]:
                with uds_client(daemon.socket) as client:
                    r = client.post("/v1/completions", json={"prompt": "Edge computing is", "max_tokens": 4})
                    r.raise_for_status()
                    return r.json()  # type: ignore[no-any-return]

            body = await asyncio.to_thread(complete)
            assert body["model"] == "gemma"
            assert any(e.status == "activated" for _, e in store.events("dev-a"))
            assert daemon.stop() == 0
            deadline = time.monotonic() + 10
            while (
                time.monotonic() < deadline and next(r for r in store.devices() if r.device == "dev-a").online
            ):
                await asyncio.sleep(0.2)
            assert not next(r for r in store.devices() if r.device == "dev-a").online
        finally:
            await hub.close()
