"""The fleet simulator at small scale against a real Mosquitto (shipped config and plugin) and a
real ``edge-hub serve`` process: 20 boxes, each with its own certificate and connection.

The hub's inventory must hold every box with its reported hardware and health, every event must
be acknowledged and stored once, every audit record stored with an intact, signed chain; and a
staged rollout started with ``edge-hub rollout start`` must follow the boxes' health (a table of
named cases: healthy, smoke test failure on the new version, 40 % slower).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from hub.rollout.store import RolloutStore
from hub.sync.store import HubStore
from registry.publish import set_deployment
from tests.fleetsim.box import HEALTHY, SLOWER, SMOKE_FAILS, Behaviour
from tests.fleetsim.conftest import BOXES
from tests.fleetsim.fleet import REPO, HubProcess, SimFleet, wait_store
from tests.fleetsim.pki import device_ids
from tests.sync.broker import Broker
from tests.sync.helpers import make_blob, new_repo, publish_model

pytestmark = pytest.mark.slow
EVENTS = 5
RECORDS = 1500  # two batches: the second must chain onto the first


@dataclass
class Sim:
    repo: Path
    db: Path
    hub: HubProcess
    fleet: SimFleet


@contextlib.asynccontextmanager
async def sim(
    broker: Broker, tmp: Path, behaviour: Callable[[str], Behaviour] | None = None
) -> AsyncIterator[Sim]:
    repo = new_repo(tmp / "repo")
    publish_model(repo, make_blob(tmp / "v1.bin", 50_000, 1), "m", "1", group=None, name="model.gguf")
    publish_model(repo, make_blob(tmp / "v2.bin", 50_000, 2), "m", "2", group=None, name="model.gguf")
    set_deployment(repo, "edge", "m", version="1", pin=True)
    repo.publish()
    hub = HubProcess(repo.path, tmp / "hub.db", tmp, "127.0.0.1", broker.service_port, broker.certdir,
                     rollout_interval_s=0.5)  # fmt: skip
    hub.start()
    root = (repo.path / "metadata" / "1.root.json").read_bytes()
    fleet = SimFleet(device_ids(BOXES), broker.client_config, root, behaviour=behaviour)
    try:
        fleet.register_keys(hub.db)
        await fleet.start(timeout=60)
        yield Sim(repo.path, hub.db, hub, fleet)
    finally:
        await fleet.close()
        hub.stop()


def on_version(store: HubStore, version: str, n: int = BOXES) -> bool:
    return sum(r.state is not None and r.state.serving.get("m") == version for r in store.devices()) == n


async def test_fleet_reaches_the_hub(sim_broker: Broker, tmp_path: Path) -> None:
    async with sim(sim_broker, tmp_path) as s:
        await s.fleet.wait(lambda b: b.serving.get("m") == "1", 60, "every box on m 1")
        await wait_store(s.db, lambda st: on_version(st, "1"), 30, "the inventory has every box on m 1")
        for b in s.fleet.boxes:
            b.add_audit(RECORDS)
            for i in range(EVENTS):
                await b.report_event("model", "probe", f"models/m/{i}")
        await asyncio.gather(*(b.upload_audit(60) for b in s.fleet.boxes))
        await asyncio.gather(*(b.wait_events_acked(60) for b in s.fleet.boxes))
        store = HubStore(s.db)
        rows = {r.device: r for r in store.devices()}
        assert sorted(rows) == device_ids(BOXES)
        for d, r in rows.items():
            assert r.online, d
            assert r.state is not None and r.state.hardware.get("memory"), d
            assert any(h["version"] == "1" and h["activation"] == "passed" for h in r.state.health), d
            assert r.audit_seq == RECORDS and r.problem is None, (d, r.audit_seq, r.problem)
            assert store.audit_count(d) == (RECORDS, RECORDS)
            assert store.verify_device(d) == (RECORDS, [])
            events = store.events(d)
            # one activation + EVENTS probes, each stored once
            assert len(events) == EVENTS + 1 and len({e.id for _, e in events}) == EVENTS + 1, events
        assert all(not b.outbox and b.uploaded == RECORDS for b in s.fleet.boxes)
        assert all(not b.stats.refusals for b in s.fleet.boxes), [b.stats.refusals for b in s.fleet.boxes]
        assert s.fleet.verifier.verified >= 1
        store.close()


def rollout_start(s: Sim, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hub.cli", "rollout", "start", "--group", "edge", "--model", "m",
            "--version", "2", "--waves", "10%,100%", "--min-samples", "5", "--min-requests", "5",
            "--soak-s", "3600", "--repo", str(s.repo), "--db", str(s.db), *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("v2", "final", "first_wave_on_v2", "all_on_v2"),
    [
        pytest.param(HEALTHY, "completed", True, True, id="healthy-completes"),
        pytest.param(SMOKE_FAILS, "rolled_back", False, False, id="smoke-failure-rolls-back"),
        pytest.param(SLOWER, "paused", True, False, id="40pct-slower-pauses"),
    ],
)
async def test_rollout_follows_health(
    sim_broker: Broker, tmp_path: Path, v2: str, final: str, first_wave_on_v2: bool, all_on_v2: bool
) -> None:
    async with sim(sim_broker, tmp_path, lambda _d: Behaviour({"2": v2})) as s:
        await wait_store(s.db, lambda st: on_version(st, "1"), 60, "the inventory has every box on m 1")
        done = rollout_start(s)
        assert done.returncode == 0, done.stderr
        store = RolloutStore(HubStore(s.db))
        rollout = store.latest("edge")
        assert rollout is not None
        await wait_store(
            s.db, lambda _st: (r := store.get(rollout.id)) is not None and r.state == final, 90, final
        )
        after = store.get(rollout.id)
        assert after is not None
        first = {d for d, w in after.devices.items() if w == 0}
        assert len(first) == 2, after.devices  # 10 % of 20
        if all_on_v2:
            await s.fleet.wait(lambda b: b.serving.get("m") == "2", 60, "every box on m 2")
        else:
            await asyncio.sleep(1.0)
            on_v2 = {b.id for b in s.fleet.boxes if b.serving.get("m") == "2"}
            assert on_v2 == (first if first_wave_on_v2 else set()), on_v2
